"""Tests of sedd_jax.training.run: the compile caches (in-process and persistent), the restore of a
job, validation batches."""

import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from helpers import train_config
from sedd_jax.training import checkpointer
from sedd_jax.training import run as run_lib
from sedd_jax.training import sedd_task as sedd_task_lib
from sedd_jax.training import sharding


def test_compile_cache_builds_once_per_kind_config_mesh_and_options(tmp_path):
  cache, built = run_lib.CompileCache(), []
  cfg = train_config(tmp_path)
  one, two = sharding.make_mesh(jax.devices()[:1]), sharding.make_mesh(jax.devices()[:2])

  def get(kind, c, mesh, options):
    return cache.get(kind, c, mesh, options, lambda: built.append(kind) or len(built))

  assert get("train", cfg, one, {}) == get("train", cfg, one, {}) == 1
  assert get("eval", cfg, one, {}) == 2
  assert get("train", cfg, two, {}) == 3
  assert get("train", cfg, one, {"xla_backend_optimization_level": 0}) == 4
  assert get("train", train_config(tmp_path, **{"model.dropout": 0.0}), one, {}) == 5
  assert get("train", train_config(tmp_path), one, {}) == 1  # an equal config: the same entry
  assert len(built) == 5


class _Ckpt:
  def __init__(self, restored):
    self.restored, self.calls = restored, []

  def restore_latest(self, state, shardings, cfg):
    self.calls.append((state, shardings, cfg))
    return self.restored


def test_restore_is_the_step_0_state_or_the_newest_checkpoint_with_its_data_state(tmp_path,
                                                                                  caplog):
  cfg = train_config(tmp_path)
  built = types.SimpleNamespace(state="state0", shardings="shardings")
  ckpt = _Ckpt(None)
  assert run_lib.restore(ckpt, built, cfg) == ("state0", None)
  assert ckpt.calls == [("state0", "shardings", cfg)]
  saved = train_config(tmp_path, **{"optim.lr": 1e-2})
  restored = checkpointer.Restored(state="state7", data_state={"position": 9}, step=7,
                                   config=saved, path=tmp_path / "7")
  with caplog.at_level(logging.WARNING):
    assert run_lib.restore(_Ckpt(restored), built, cfg) == ("state7", {"position": 9})
  assert "config differs from the checkpoint's in: optim.lr" in caplog.text


def test_validation_batches_are_fixed_rows_of_the_task_keys(store, tmp_path):  # noqa: F811
  cfg = train_config(store, **{"training.eval_every": 2, "training.accum": 2,
                               "training.eval_batches": 3})
  task = sedd_task_lib.SeddTask.from_config(cfg)
  batches = run_lib.validation_batches(cfg, task)
  assert len(batches) == 3
  for b in batches:
    assert sorted(b) == sorted(task.batch_keys)
    assert b["tokens"].shape == (4, 32) and b["lengths"].shape == (4,)  # batch 8 / accum 2
  again = run_lib.validation_batches(cfg, task)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  off = train_config(store, **{"training.eval_every": 0, "training.sample_every": 0})
  assert run_lib.validation_batches(off, task) == []


@pytest.fixture
def jax_cache_settings():
  """Restores jax's persistent-cache settings (conftest turns the cache off) after a test."""
  names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs")
  saved = {n: getattr(jax.config, n) for n in names}
  yield
  for n, v in saved.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


def test_persistent_cache_writes_compiled_programs_and_an_existing_folder_wins(
    tmp_path, monkeypatch, jax_cache_settings):
  assert run_lib.use_persistent_cache(str(tmp_path / "off")) is None  # disabled (conftest)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", None)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  assert run_lib.use_persistent_cache("") is None
  assert jax.config.jax_compilation_cache_dir is None
  monkeypatch.setenv("HOME", str(tmp_path))
  folder = run_lib.use_persistent_cache("~/xla")
  assert folder == str(tmp_path / "xla") == jax.config.jax_compilation_cache_dir
  compilation_cache.reset_cache()
  x = jnp.arange(7.0)
  np.testing.assert_allclose(jax.jit(lambda a: jnp.sin(a) * 3.0 + 1.25)(x), np.sin(x) * 3 + 1.25,
                             rtol=1e-6)
  assert [p.name for p in (tmp_path / "xla").iterdir() if p.name.startswith("jit_")]
  assert run_lib.use_persistent_cache(str(tmp_path / "other")) == folder  # jax's folder wins
  assert not (tmp_path / "other").exists()
