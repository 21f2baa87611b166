"""The run's Checkpointer: round trip, retention with milestones, shape check, corrupt fallback,
a full disk, nothing left running after close."""

import asyncio
import errno
import gc
import logging
import os
import pathlib
import re
import threading

import jax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from orbax.checkpoint._src.path import temporary_paths

from helpers import FAST, assert_trees_equal, checkpoint_config, state_at, train_config
from sedd_jax import config as config_lib
from sedd_jax import diffusion
from sedd_jax.training import checkpoint as ckpt_lib
from sedd_jax.training import checkpointer
from sedd_jax.training import loop
from sedd_jax.training import state as state_lib

# A deliberately failing orbax restore leaves asyncio read tasks that are reported when collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_roundtrip_all_contents(tmp_path, micro_state):
  cfg, state = micro_state
  ck = checkpointer.Checkpointer(tmp_path, keep=3)
  s3 = state_at(state, 3)
  data_state = {"position": 17, "buckets": [[1, 2]], "leftovers": None}
  assert ck.save(s3, data_state, cfg)
  assert not ck.save(s3, data_state, cfg)  # same step: not written twice
  ck.wait()
  r = ck.restore_latest(state)
  assert r.step == 3 and r.data_state == data_state
  assert config_lib.diff(r.config, cfg) == []
  assert_trees_equal(r.state, s3)
  assert int(r.state.skipped) == 1
  ck.close()
  # Documented layout.
  step_dir = tmp_path / "checkpoints" / "3"
  for item in ("params", "ema", "opt_state", "train", "data", "config"):
    assert (step_dir / item).is_dir(), item
  raw = ckpt_lib.read_items(step_dir)
  assert raw["train"]["step"] == 3 and raw["train"]["format"] == checkpointer.FORMAT
  assert_trees_equal(raw["params"], nnx.to_pure_dict(s3.params))


def test_bytes_data_state(tmp_path, micro_state):
  cfg, state = micro_state
  ck = checkpointer.Checkpointer(tmp_path)
  ck.save(state_at(state, 1), b'{"a": 1}', cfg)
  ck.wait()
  assert ck.restore_latest(state).data_state == b'{"a": 1}'
  ck.close()


def test_keep_last_n_plus_milestones(tmp_path, micro_state):
  cfg, state = micro_state
  ck = checkpointer.Checkpointer(tmp_path, keep=2, milestone_every=4, async_save=False)
  for step in range(1, 11):
    ck.save(state_at(state, step), None, cfg)
  ck.wait()
  assert ck.all_steps() == [4, 8, 9, 10]
  ck.close()


def _corrupt(step_dir: pathlib.Path):
  """Garbles every file of the params item (as a torn write or a bad disk would)."""
  for f in (step_dir / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(b"\x00garbage")


def test_corrupt_latest_falls_back(tmp_path, micro_state, caplog):
  cfg, state = micro_state
  ck = checkpointer.Checkpointer(tmp_path, keep=5)
  for step in (1, 2):
    ck.save(state_at(state, step), {"position": step}, cfg)
  ck.wait()
  _corrupt(tmp_path / "checkpoints" / "2")
  # A half-written checkpoint (orbax's temporary folder) is ignored.
  (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234").mkdir()
  with caplog.at_level(logging.ERROR):
    r = ck.restore_latest(state)
  assert r.step == 1 and r.data_state == {"position": 1}
  assert_trees_equal(r.state, state_at(state, 1))
  assert "step 2" in caplog.text and str(tmp_path / "checkpoints" / "2") in caplog.text
  moved = list((tmp_path / checkpointer.CORRUPT).iterdir())
  assert [p.name.split("-")[0] for p in moved] == ["2"]
  assert ck.all_steps() == [1]
  # Training goes on: step 2 can be written again.
  assert ck.save(state_at(state, 2, seed=7), None, cfg)
  ck.wait()
  assert ck.restore_latest(state).step == 2
  ck.close()


def test_all_corrupt_raises_and_moves_nothing(tmp_path, micro_state):
  cfg, state = micro_state
  ck = checkpointer.Checkpointer(tmp_path)
  ck.save(state_at(state, 1), None, cfg)
  ck.wait()
  _corrupt(tmp_path / "checkpoints" / "1")
  with pytest.raises(ckpt_lib.CheckpointError, match="step 1"):
    ck.restore_latest(state)
  assert (tmp_path / "checkpoints" / "1").is_dir()
  ck.close()


def test_changed_model_shape_names_the_keys_and_moves_nothing(tmp_path, micro_state, caplog):
  """A config of another model shape: one error naming the arrays and the config keys that
  differ, with what to do; no restore is attempted (no error logged) and nothing is moved."""
  cfg, state = micro_state
  ck = checkpointer.Checkpointer(tmp_path)
  ck.save(state_at(state, 1), None, cfg)
  ck.wait()
  other = checkpoint_config()
  other.model.hidden_size = 64
  other.training.steps = 7
  graph = diffusion.get_graph(other.graph)
  _, p2, _ = state_lib.split_model(state_lib.build_model(other, graph))
  with caplog.at_level(logging.ERROR), pytest.raises(ckpt_lib.ShapeMismatch) as err:
    ck.restore_latest(state_lib.init_state(other, p2), cfg=other)
  msg = str(err.value)
  # adaLN_modulation.bias has 6 * hidden_size entries.
  assert "arrays differ, e.g. params blocks.0.adaLN_modulation.bias: saved (192,), now (384,))" in msg
  assert ("differ from the checkpoint's: model.hidden_size (saved 32, now 64), "
          "training.steps (saved 600, now 7).") in msg
  assert "--fresh" in msg and "--workdir" in msg
  assert caplog.records == []
  assert ck.all_steps() == [1] and not (tmp_path / checkpointer.CORRUPT).exists()
  ck.close()


@pytest.mark.parametrize("error", [
  OSError(errno.EIO, "Input/output error"),
  MemoryError("out of memory"),
  ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4096 bytes"),
  RuntimeError("restore failed"),
], ids=["eio", "memory", "resource_exhausted", "runtime"])
def test_errors_other_than_unreadable_files_stop_and_move_nothing(tmp_path, micro_state, error):
  """Only a checkpoint that is really unreadable falls back; a transient I/O error or an
  out-of-memory while reading the newest one is raised, and no checkpoint is moved aside."""
  cfg, state = micro_state
  ck = checkpointer.Checkpointer(tmp_path, keep=5)
  for step in (1, 2):
    ck.save(state_at(state, step), None, cfg)
  ck.wait()
  real_restore = ck._manager.restore

  def failing_restore(step, *args, **kwargs):
    if step == 2:
      try:
        raise error
      except Exception as e:  # as orbax wraps TensorStore's errors
        raise Exception("Encountered error while reading array index") from e
    return real_restore(step, *args, **kwargs)

  ck._manager.restore = failing_restore
  with pytest.raises(Exception, match="Encountered error") as err:
    ck.restore_latest(state)
  assert err.value.__cause__ is error
  assert ck.all_steps() == [1, 2] and not (tmp_path / checkpointer.CORRUPT).exists()
  ck.close()


def test_unreadable_checkpoint_message_names_the_file_and_the_problem(tmp_path, micro_state,
                                                                      caplog):
  """Truncated array data and malformed metadata: the log names the file and the problem, with
  no TensorStore repr."""
  cfg, state = micro_state
  ck = checkpointer.Checkpointer(tmp_path, keep=5)
  for step in (1, 2, 3):
    ck.save(state_at(state, step), None, cfg)
  ck.wait()
  for f in (tmp_path / "checkpoints" / "3" / "params" / "ocdbt.process_0" / "d").iterdir():
    f.write_bytes(f.read_bytes()[:5])  # truncated
  (tmp_path / "checkpoints" / "2" / "opt_state" / "_METADATA").write_text('{"tree_metadata": ')
  with caplog.at_level(logging.ERROR):
    r = ck.restore_latest(state)
  assert r.step == 1
  lines = [rec.getMessage() for rec in caplog.records if "cannot be read" in rec.getMessage()]
  assert len(lines) == 2
  assert re.search(r"step 3 .*OUT_OF_RANGE: Error reading \"[\w./]+\" in OCDBT database at "
                   rf"local file \"{tmp_path}/checkpoints/3/params/\": .*not valid", lines[0])
  assert (f"step 2 ({tmp_path}/checkpoints/2) cannot be read: {tmp_path}/checkpoints/2/opt_state/"
          "_METADATA is not valid JSON") in lines[1]
  assert "TensorStore(" not in caplog.text and "bound method" not in caplog.text
  moved = (tmp_path / checkpointer.CORRUPT).iterdir()
  assert sorted(p.name.split("-")[0] for p in moved) == ["2", "3"]
  ck.close()


def test_unretrieved_read_errors_of_a_damaged_checkpoint_are_not_logged(caplog):
  """orbax's concurrent reads of a damaged checkpoint fail together; asyncio logs the ones never
  retrieved, with TensorStore's spec, when they are freed. Those are dropped; any other
  unretrieved exception is still logged."""

  def unretrieved(error):
    loop = asyncio.new_event_loop()
    try:
      loop.create_future().set_exception(error)  # freed at once, exception never retrieved
      gc.collect()
    finally:
      loop.close()

  damage = ValueError('OUT_OF_RANGE: Error reading "a/0.0": not valid [tensorstore_spec=...]')
  wrapped = Exception("Encountered error while reading array index: TensorStore({...})")
  wrapped.__cause__ = damage
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    unretrieved(wrapped)
    assert caplog.records == []
    unretrieved(RuntimeError("a bug elsewhere"))
  assert [r.name for r in caplog.records] == ["asyncio"]
  assert "exception was never retrieved" in caplog.records[0].getMessage()
  assert "a bug elsewhere" in caplog.text


def _json_writes_fail(monkeypatch, from_step: int) -> None:
  """A full disk for the checkpoints from step `from_step` on: orbax's JSON items (train, data,
  config), written in its background commit threads, fail as Python's file writes do."""
  real = ocp.handlers.JsonCheckpointHandler._save_fn

  async def full(self, x, directory):
    if int(directory.parent.name.split(".")[0]) >= from_step:  # <step>[.orbax-...]/<item>
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
    return await real(self, x, directory)

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", full)


def _disk_usage(folder: pathlib.Path) -> int:
  return sum(os.stat(os.path.join(d, f)).st_blocks * 512
             for d, _, files in os.walk(folder) for f in files)


def test_disk_full_is_one_error_and_the_older_checkpoints_restore(tmp_path, micro_state,
                                                                  monkeypatch, caplog):
  """A save that runs out of disk space (raised in orbax's background thread): one DiskFull
  naming the folder, the size needed and what to do, nothing logged, no partial folder left;
  the older checkpoints (retention keep=2 would have deleted step 1) restore exactly, and the
  next save, once there is space, works."""
  cfg, state = micro_state
  ck = checkpointer.Checkpointer(tmp_path, keep=2)
  for step in (1, 2):
    ck.save(state_at(state, step), {"position": step}, cfg)
  ck.wait()
  _json_writes_fail(monkeypatch, from_step=3)
  with caplog.at_level(logging.INFO):
    assert ck.save(state_at(state, 3), {"position": 3}, cfg)  # fails in the background
    with pytest.raises(checkpointer.DiskFull) as err:
      ck.wait()
  folder = tmp_path / "checkpoints"
  size = _disk_usage(folder / "2") / 2**10
  free = r"\d+(\.\d)? (B|KiB|MiB|GiB|TiB)"  # what the disk has now (others write to it too)
  assert re.fullmatch(re.escape(
      f"no space left on device for the checkpoint of step 3 in {folder}: it needs about "
      f"{size:.1f} KiB (step 2 takes that on disk), ") + free + re.escape(
      " are free there with its partial folder removed. Free space (or lower training.keep); "
      "the older checkpoints (steps 1, 2) are intact; run the same command to resume from step "
      "2."), str(err.value)), str(err.value)
  assert isinstance(err.value, ckpt_lib.CheckpointError)  # the train CLI: one line, exit 2
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
  assert sorted(p.name for p in folder.iterdir()) == ["1", "2"]
  ck.wait()  # reported once
  for step in (1, 2):
    r = ck.restore(step, state)
    assert r.data_state == {"position": step}
    assert_trees_equal(r.state, state_at(state, step))
  monkeypatch.undo()  # space again: training goes on
  assert ck.save(state_at(state, 3), None, cfg)
  ck.wait()
  assert ck.all_steps() == [2, 3]
  ck.close()


def test_disk_full_from_the_first_checkpoint_names_the_arrays(tmp_path, micro_state,
                                                              monkeypatch):
  cfg, state = micro_state
  _json_writes_fail(monkeypatch, from_step=0)
  ck = checkpointer.Checkpointer(tmp_path)
  ck.save(state_at(state, 1), None, cfg)
  with pytest.raises(checkpointer.DiskFull, match=(
      r"checkpoint of step 1 in .*: it needs about 366\.0 KiB \(its arrays: params, EMA and "
      r"optimizer state\), .* there is no older checkpoint; run the same command to start "
      r"again\.$")):
    ck.save(state_at(state, 2), None, cfg)  # the previous save's error comes first
  # params, EMA and Adam's two moments of the micro model's 23,425 float32 parameters, and
  # two int32 step counts of the optimizer.
  assert f"{(4 * 23_425 * 4 + 2 * 4) / 2**10:.1f}" == "366.0"
  assert list((tmp_path / "checkpoints").iterdir()) == []
  ck.close()


def test_is_disk_full():
  tensorstore = ValueError(  # what TensorStore raised when a real (tmpfs) disk filled up
    'RESOURCE_EXHAUSTED: Error writing "1.0.mu.blocks.0.mlp_in.bias.value/0" in OCDBT database '
    'at local file "/tmp/run/checkpoints/8.orbax-checkpoint-tmp/opt_state.orbax-checkpoint-tmp'
    '/ocdbt.process_0/": Failed writing: "/tmp/run/checkpoints/8.orbax-checkpoint-tmp/opt_state'
    '.orbax-checkpoint-tmp/ocdbt.process_0/d/2751d6b2": Failed to write 3880 bytes to file 7: '
    "No space left on device [os_error_code='28']")
  wrapped = RuntimeError("Failed to run 8 Handler Commit operations")
  wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
  assert checkpointer.is_disk_full(tensorstore) and checkpointer.is_disk_full(wrapped)
  for other in (OSError(errno.EIO, "Input/output error"), MemoryError("out of memory"),
                ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4096 "
                           "bytes")):
    assert not checkpointer.is_disk_full(other)


def test_a_finished_run_leaves_no_thread_running(tmp_path, micro_state, store, monkeypatch):
  """`train` on a finished run creates and closes a Checkpointer. orbax's clean-up of
  unfinished saves ran in a thread that `close()` did not join; still running when the process
  exited, it printed "RuntimeError: cannot schedule new futures after interpreter shutdown".
  Slowed down here (5 s), so that it would always still run: nothing may be left running."""
  cfg, state = micro_state
  ck = checkpointer.Checkpointer(tmp_path)
  ck.save(state_at(state, 6), None, cfg)
  ck.close()
  (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-123").mkdir()  # a save cut short
  real_cleanup = temporary_paths.cleanup_temporary_paths

  async def slow_cleanup(*args, **kwargs):
    await asyncio.sleep(5)
    return await real_cleanup(*args, **kwargs)

  monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_cleanup)
  before = set(threading.enumerate())
  result = loop.train(train_config(store, **{"training.steps": 6}), tmp_path)
  assert (result.code, result.step, result.reason) == (0, 6, "done")
  started = [t for t in threading.enumerate()  # Python's threads (not TensorStore's)
             if t not in before and not isinstance(t, threading._DummyThread)]
  for t in started:  # an event loop's executor worker may still be on its way out
    threading.Thread.join(t, timeout=1)  # (orbax's threads' own join raises on a timeout)
  assert [t.name for t in started if t.is_alive()] == []
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6"]


def test_a_full_disk_stops_training_with_one_error(tmp_path, store, monkeypatch, caplog):
  """The job's last checkpoint (step 4) does not fit: `train` raises DiskFull (the CLI prints
  it as one `error:` line, exit code 2) and logs nothing else; step 2 stays; once there is
  space, the same call resumes from it."""
  cfg = train_config(store, **{"training.steps": 4, "training.ckpt_every": 2})
  devices = jax.devices()[:1]
  _json_writes_fail(monkeypatch, from_step=4)
  with caplog.at_level(logging.WARNING), pytest.raises(checkpointer.DiskFull, match=(
      r"checkpoint of step 4 .* the older checkpoints \(steps 2\) are intact; run the same "
      r"command to resume from step 2\.$")):
    loop.train(cfg, tmp_path, devices=devices, compiler_options=FAST)
  assert caplog.records == []
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
  assert ckpt_lib.read_items(tmp_path / "checkpoints" / "2")["train"]["step"] == 2
  monkeypatch.undo()
  assert loop.train(cfg, tmp_path, devices=devices, compiler_options=FAST).step == 4
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]
