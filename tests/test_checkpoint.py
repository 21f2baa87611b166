"""The checkpoint format (`sedd_jax.training.checkpoint`): damage reports, file checks, saved
shapes, config and step-folder lookup, inference checkpoints."""

import errno
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import state_at
from sedd_jax import config as config_lib
from sedd_jax.training import checkpoint as ckpt_lib
from sedd_jax.training import checkpointer

# A deliberately failing orbax restore leaves asyncio read tasks that are reported when collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_load_for_inference_uses_ema(tmp_path, micro_state):
  cfg, state = micro_state
  ck = checkpointer.Checkpointer(tmp_path)
  s = state_at(state, 5)
  s = s.replace(ema=jax.tree.map(lambda x: x * 0 + 0.5, s.ema))
  ck.save(s, None, cfg)
  ck.wait()
  ck.close()
  for path in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "5"):
    model, cfg2, graph, noise = ckpt_lib.load_for_inference(path)
    assert config_lib.diff(cfg2, cfg) == []
    assert graph.dim == 33 and noise is not None
    np.testing.assert_array_equal(np.asarray(model.vocab_embed.embedding[...]), 0.5)
    out = model(jnp.full((2, 8), 5, jnp.int32), jnp.ones((2,)))
    assert out.shape == (2, 8, 33)
  model, *_ = ckpt_lib.load_for_inference(tmp_path, use_ema=False)
  assert not np.allclose(np.asarray(model.vocab_embed.embedding[...]), 0.5)


def test_params_only_checkpoint(tmp_path, micro_state):
  """The format sedd_jax.convert writes: items params/ema + config (or a config.json)."""
  cfg, state = micro_state
  ckpt_lib.save_inference_checkpoint(tmp_path / "converted" / "checkpoints" / "0", state.params,
                                     cfg)
  model, cfg2, _, _ = ckpt_lib.load_for_inference(tmp_path / "converted")
  np.testing.assert_array_equal(np.asarray(model.vocab_embed.embedding[...]),
                                np.asarray(state.params["vocab_embed"]["embedding"][...]))
  # No `config` item, a config.json beside it instead.
  step = tmp_path / "converted" / "checkpoints" / "0"
  shutil.rmtree(step / "config")
  (tmp_path / "converted" / "config.json").write_text(config_lib.to_json(cfg))
  model, cfg3, _, _ = ckpt_lib.load_for_inference(step)
  assert cfg3.model.hidden_size == 32


def test_load_for_inference_skips_corrupt(tmp_path, micro_state, caplog):
  cfg, state = micro_state
  ck = checkpointer.Checkpointer(tmp_path)
  ck.save(state_at(state, 1), None, cfg)
  ck.save(state_at(state, 2), None, cfg)
  ck.wait()
  ck.close()
  for f in (tmp_path / "checkpoints" / "2" / "ema").rglob("*"):
    if f.is_file():
      f.write_bytes(b"junk")
  with caplog.at_level(logging.ERROR):
    ckpt_lib.load_for_inference(tmp_path)
  assert f"{tmp_path}/checkpoints/2/ema/_METADATA is not valid JSON" in caplog.text


def test_unreadable_reason_names_damage_and_nothing_else():
  missing = FileNotFoundError(errno.ENOENT, "No such file", "/ck/3/params/d/x")
  assert ckpt_lib.unreadable_reason(missing) == "/ck/3/params/d/x: missing"
  try:
    json.loads('{"a": ')
  except json.JSONDecodeError as e:
    bad_json = e
  assert ckpt_lib.unreadable_reason(bad_json).startswith("malformed file (JSONDecodeError: ")
  store = ValueError('DATA_LOSS: Error reading "x" [tensorstore_spec={"driver": "zarr"}]')
  assert ckpt_lib.unreadable_reason(store) == 'DATA_LOSS: Error reading "x"'
  wrapped = RuntimeError("restore failed")
  wrapped.__cause__ = store
  assert ckpt_lib.unreadable_reason(wrapped) == 'DATA_LOSS: Error reading "x"'
  for other in (OSError(errno.EIO, "I/O error"), MemoryError(), ValueError("UNAVAILABLE: busy"),
                RuntimeError("a bug")):
    assert ckpt_lib.unreadable_reason(other) is None, other


def test_check_files_names_the_missing_item_and_the_malformed_file(tmp_path):
  step = tmp_path / "7"
  for item in ckpt_lib.ITEMS:
    (step / item).mkdir(parents=True)
    (step / item / "_METADATA").write_text("{}")
  ckpt_lib.check_files(step)
  (step / "ema" / "_METADATA").write_text('{"tree_metadata": ')
  with pytest.raises(ckpt_lib.UnreadableCheckpoint, match=rf"{step}/ema/_METADATA is not valid"):
    ckpt_lib.check_files(step)
  ckpt_lib.check_files(step, ("params", "config"))  # only the items asked for
  shutil.rmtree(step / "config")
  with pytest.raises(ckpt_lib.UnreadableCheckpoint, match=rf"{step}/config is missing"):
    ckpt_lib.check_files(step, ("params", "config"))


def test_saved_shapes_step_folders_and_config_lookup(tmp_path, micro_state):
  cfg, state = micro_state
  step = tmp_path / "run" / "checkpoints" / "4"
  ckpt_lib.save_inference_checkpoint(step, state.params, cfg)
  (tmp_path / "run" / "checkpoints" / "2" / "ema").mkdir(parents=True)
  (tmp_path / "run" / "checkpoints" / "9").mkdir()  # no weights: not a checkpoint
  params = ckpt_lib.pure_dict(state.params)
  assert ckpt_lib.saved_shape_changes(step, "params", params) == []
  wider = jax.tree.map(lambda x: x, params)
  wider["vocab_embed"]["embedding"] = np.zeros((33, 64), np.float32)
  assert ckpt_lib.saved_shape_changes(step, "ema", wider) == [
      "ema vocab_embed.embedding: saved (33, 32), now (33, 64)"]
  want = [step, tmp_path / "run" / "checkpoints" / "2"]
  assert ckpt_lib.resolve_checkpoint_dirs(tmp_path / "run") == want
  assert ckpt_lib.resolve_checkpoint_dirs(tmp_path / "run" / "checkpoints") == want
  assert ckpt_lib.resolve_checkpoint_dirs(step) == [step]
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    ckpt_lib.resolve_checkpoint_dirs(tmp_path)
  assert config_lib.diff(ckpt_lib.read_config(step), cfg) == []
  lone = tmp_path / "run" / "checkpoints" / "2"
  with pytest.raises(FileNotFoundError, match="no config item and no config.json"):
    ckpt_lib.read_config(lone)
  (tmp_path / "run" / "config.json").write_text(config_lib.to_json(cfg))  # 2 folders above
  assert ckpt_lib.read_config(lone).model.hidden_size == 32
