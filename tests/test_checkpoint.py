"""The checkpoint format (`sedd_jax.training.checkpoint`): damage reports, file checks, saved
shapes, config and step-folder lookup, inference checkpoints."""

import _thread
import asyncio
import errno
import gc
import json
import logging
import re
import shutil
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import state_at
from sedd_jax import config as config_lib
from sedd_jax.training import checkpoint as ckpt_lib
from sedd_jax.training import checkpointer


def _truncate_ema_arrays(step_dir) -> None:
  """Cuts every array data file of the checkpoint's EMA item to 5 bytes (a torn copy)."""
  for f in (step_dir / "ema").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:5])


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
    loaded = ckpt_lib.load_inference_checkpoint(tmp_path)
  assert f"{tmp_path}/checkpoints/2/ema/_METADATA is not valid JSON" in caplog.text
  assert loaded.step == 1 and loaded.step_dir == tmp_path / "checkpoints" / "1"
  assert loaded.run_dir == tmp_path and loaded.weights == "ema"
  assert ckpt_lib.load_inference_checkpoint(tmp_path, use_ema=False).weights == "params"


# An unraisable exception (the "Exception ignored in" traceback) fails the test.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoints_fall_back_without_exception_ignored_reports(tmp_path, micro_state,
                                                                         caplog):
  """Five newest checkpoints with truncated EMA arrays: the sixth is loaded, each damaged one
  is logged once, and the reads orbax abandoned leave no unraisable exception behind."""
  cfg, state = micro_state
  good = tmp_path / "checkpoints" / "0"
  ckpt_lib.save_inference_checkpoint(good, state.params, cfg)
  for step in range(1, 6):
    shutil.copytree(good, tmp_path / "checkpoints" / str(step))
    _truncate_ema_arrays(tmp_path / "checkpoints" / str(step))
  with caplog.at_level(logging.ERROR):
    loaded = ckpt_lib.load_inference_checkpoint(tmp_path)
    gc.collect()
    time.sleep(0.2)  # TensorStore's last completions reach the closed loops
    gc.collect()
  assert loaded.step == 0 and loaded.run_dir == tmp_path
  logged = [r.getMessage() for r in caplog.records]
  assert [m.split(" cannot be read: ")[0] for m in logged] == [
      f"checkpoint {tmp_path}/checkpoints/{s}" for s in range(5, 0, -1)]
  _truncate_ema_arrays(good)
  with pytest.raises(ckpt_lib.UnreadableCheckpoint, match=re.escape(
      "no checkpoint can be read, the files of each are damaged (truncated, overwritten or "
      f"missing): {tmp_path}/checkpoints/5: ")) as e:
    ckpt_lib.load_inference_checkpoint(tmp_path)
  assert str(e.value).count(f"in OCDBT database at local file \"{tmp_path}/checkpoints/") == 6


def test_only_the_leftovers_of_abandoned_reads_are_dropped():
  """The unraisablehook filter drops an orbax read coroutine that turned its GeneratorExit into
  an exception and a completion that found its loop closed, called from native code; the same
  errors elsewhere, and any other, reach the previous hook."""
  from orbax.checkpoint._src.serialization import serialization

  seen = []
  hook = ckpt_lib._drop_abandoned_reads(seen.append)

  def unraisable(exc, obj=None, tb=None):
    return types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=tb,
                                 err_msg=None, object=obj)

  closed = Exception("Encountered error while reading array index: (slice(0, 16, 1),)")
  closed.__context__ = GeneratorExit()
  read = serialization._read_array_index_and_device_put(None, (), None, global_shape=(),
                                                          new_shard_shape=(), dtype=None,
                                                          byte_limiter=None, strict=True,
                                                          dll=None, memory_kind=None)

  async def elsewhere():
    pass

  other = elsewhere()
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:
    late = e
  native = late.__traceback__.tb_next  # as TensorStore's thread calls it: no Python caller
  try:
    hook(unraisable(closed, read))
    hook(unraisable(late, None, native))
    assert seen == []
    for passed in (unraisable(closed, other), unraisable(late, None, late.__traceback__),
                   unraisable(RuntimeError("Event loop is closed")),
                   unraisable(ValueError("a bug in __del__"), object())):
      hook(passed)
    assert len(seen) == 4
  finally:
    read.close()
    other.close()


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


def test_late_callbacks_into_a_closed_event_loop_are_dropped():
  """TensorStore's threads report "Event loop is closed" for each write still in flight when a
  failed save's coroutine ended: dropped; the same error from a Python thread, or another
  error from TensorStore's threads, still reaches the previous hook."""
  passed = []
  late, other = RuntimeError("Event loop is closed"), RuntimeError("something else")

  def report(error):
    ckpt_lib._drop_abandoned_reads(passed.append)(types.SimpleNamespace(
      exc_value=error, object=None, exc_traceback=None))

  done = threading.Event()
  _thread.start_new_thread(lambda: (report(late), report(other), done.set()), ())  # no Thread
  assert done.wait(10)
  report(late)
  assert [u.exc_value for u in passed] == [other, late]
