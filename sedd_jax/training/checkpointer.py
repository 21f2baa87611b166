"""The checkpoints of a training run: an orbax CheckpointManager under `<workdir>/checkpoints`.

The format of a step folder (items params, ema, opt_state, train, data, config) and its
validation are `sedd_jax.training.checkpoint`'s; here the run's side of it:

Retention: the newest `cfg.training.keep` checkpoints, plus every step that is a multiple of
`cfg.training.milestone_every` (milestones, kept forever; 0 = none). Saving is asynchronous;
`wait()` blocks until everything is on disk; `check()` (one process) reports a failed
background save without waiting. orbax writes a step into `<step>.orbax-checkpoint-tmp` and
renames it when complete; such folders of unfinished saves are removed when a Checkpointer is
created (synchronously: orbax's own clean-up runs in a thread that `close()` does not join, and
one still running at interpreter exit printed "cannot schedule new futures after ... shutdown").

A full disk: the save fails (in orbax's background threads, reported at the next `save`,
`wait` or `check`) with `DiskFull`, a `CheckpointError` of one line naming the folder, the bytes
the checkpoint needs (the newest complete one's size on disk, else the state's arrays) and the
bytes free; the partial folder is removed (once orbax's threads of that save have ended) and the
older checkpoints are kept as they are (retention deletes only after a complete save). The
echoes of that one error are dropped: orbax's and asyncio's log records of it (a traceback per
failed write and thread) and TensorStore's "Event loop is closed" callbacks of the writes that
were still in flight (the `sys.unraisablehook` filter of `sedd_jax.training.checkpoint`).

Resume: `restore_latest` tries the newest step first. It first compares the shapes saved in
the checkpoint's metadata with the state the config builds: a difference (a changed model shape)
raises `ShapeMismatch` naming the arrays and the config keys that differ from the checkpoint's,
and nothing is read or moved. A checkpoint that is really unreadable (a missing item or file, a
truncated file, malformed metadata: `checkpoint.unreadable_reason`) is reported (the file and
the problem) and moved aside to `<workdir>/checkpoints_corrupt/<step>-<time>/` (never deleted)
once an older one has loaded. Any other error (an I/O error, out of memory) stops the restore
with that error and moves nothing; so does a run in which no checkpoint loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import pathlib
import shutil
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sedd_jax import config as config_lib
from sedd_jax.training import checkpoint as ckpt_lib
from sedd_jax.training import sharding
from sedd_jax.training.state import TrainState

logger = logging.getLogger(__name__)

FORMAT = 1  # of the train item
CORRUPT = "checkpoints_corrupt"
ORBAX_TMP = ".orbax-checkpoint-tmp"  # orbax's suffix of a step folder being written


class DiskFull(ckpt_lib.CheckpointError):
  """A checkpoint that did not fit on its disk (the message: folder, bytes needed and free)."""


def is_disk_full(error: BaseException) -> bool:
  """Whether `error`, or an error it chains from, is "no space left on device": an OSError
  ENOSPC (Python writes) or TensorStore's RESOURCE_EXHAUSTED error carrying that OS code."""
  seen = set()
  e = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    if f"[os_error_code='{errno.ENOSPC}']" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


class _DropDiskFullRecords(logging.Filter):
  """Drops the log records (with their tracebacks) of a disk-full error: orbax logs one for
  every failed write and thread of a save, asyncio one for each write never awaited; the
  Checkpointer reports it once (`DiskFull`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and record.exc_info[1] is not None
                and is_disk_full(record.exc_info[1]))


for _name in ("absl", "asyncio"):  # orbax logs through absl
  logging.getLogger(_name).addFilter(_DropDiskFullRecords())


def _disk_usage(folder: pathlib.Path) -> int:
  """Bytes the files under `folder` occupy on disk (their blocks)."""
  return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())


def _size(n: float) -> str:
  """'1.5 GiB', '12.0 MiB', '800 B'."""
  for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{int(n)} B"


def encode_data_state(state: Any) -> dict:
  """A grain iterator state (dict, bytes or None) -> JSON-able dict."""
  if state is None:
    return {"encoding": "none", "value": None}
  if isinstance(state, (bytes, bytearray)):
    return {"encoding": "utf8", "value": bytes(state).decode("utf-8")}
  return {"encoding": "json", "value": state}


def decode_data_state(d: dict | None) -> Any:
  """Inverse of `encode_data_state`."""
  if not d or d.get("encoding") == "none":
    return None
  if d["encoding"] == "utf8":
    return d["value"].encode("utf-8")
  return d["value"]


@dataclasses.dataclass
class Restored:
  """What `restore_latest` returns."""

  state: TrainState
  data_state: Any
  step: int
  config: ml_collections.ConfigDict | None
  path: pathlib.Path


class Checkpointer:
  """Saves and restores TrainStates under `<workdir>/checkpoints` (see the module docstring)."""

  def __init__(self, workdir: str | os.PathLike, keep: int = 3, milestone_every: int = 0,
               async_save: bool = True):
    self.workdir = pathlib.Path(workdir).absolute()
    self.directory = self.workdir / ckpt_lib.CHECKPOINTS
    self.keep = int(keep)
    self.milestone_every = int(milestone_every)
    self.async_save = async_save
    self._pending: tuple[int, int] | None = None  # (step, bytes) of the save not yet waited for
    self._threads: list[threading.Thread] = []  # orbax's threads of the pending save
    self._remove_unfinished()
    self._manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    policies = [ocp.checkpoint_managers.LatestN(n=self.keep)]
    if self.milestone_every > 0:
      policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=self.milestone_every))
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=self.async_save,
      cleanup_tmp_directories=False,  # `_remove_unfinished`, synchronously
      create=True,
    )
    return ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_path(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def save(self, state: TrainState, data_state: Any, cfg: ml_collections.ConfigDict) -> bool:
    """Writes a checkpoint at `state.step` (asynchronously); False if that step exists.

    Raises:
      DiskFull: this save, or the previous one (waited for first), ran out of disk space.
    """
    step = int(jax.device_get(state.step))
    self.wait()
    if step in self._manager.all_steps():
      return False
    train_meta = {
      "format": FORMAT,
      "step": step,
      "bad_steps": int(jax.device_get(state.bad_steps)),
      "skipped": int(jax.device_get(state.skipped)),
      "rng": [int(v) for v in np.asarray(jax.device_get(state.rng)).reshape(-1)],
    }
    args = ocp.args.Composite(
      params=ocp.args.StandardSave(ckpt_lib.pure_dict(state.params)),
      ema=ocp.args.StandardSave(ckpt_lib.pure_dict(state.ema)),
      opt_state=ocp.args.StandardSave(state.opt_state),
      train=ocp.args.JsonSave(train_meta),
      data=ocp.args.JsonSave(encode_data_state(data_state)),
      config=ocp.args.JsonSave(json.loads(config_lib.to_json(cfg))),
    )
    arrays = jax.tree.leaves((state.params, state.ema, state.opt_state))
    self._pending = (step, sum(int(a.nbytes) for a in arrays))
    before = set(threading.enumerate())
    with self._reporting_disk_full():
      self._manager.save(step, args=args, force=True)
    # orbax's own threads of this save (commit futures, finalize), not its pools' workers.
    self._threads = [t for t in threading.enumerate()
                     if t not in before and type(t).__module__.startswith("orbax.")]
    logger.debug("checkpoint: saving step %d to %s", step, self.step_path(step))
    return True

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk.

    Raises:
      DiskFull: the pending save ran out of disk space (reported once).
    """
    with self._reporting_disk_full():
      self._manager.wait_until_finished()
    self._pending, self._threads = None, []

  def check(self) -> None:
    """Raises the error (DiskFull) of a background save that has failed, without waiting for
    one in progress. One process only: with several, a failure surfaces at the next `save` or
    `wait`, which every process calls at the same step."""
    if (self._pending is not None and jax.process_count() == 1
        and not self._manager.is_saving_in_progress()):
      self.wait()

  def close(self) -> None:
    self._manager.close()

  @contextlib.contextmanager
  def _reporting_disk_full(self):
    """Turns a disk-full error of the pending save into DiskFull (after removing its partial
    folder); any other error passes unchanged."""
    try:
      yield
    except Exception as e:
      if self._pending is None or not is_disk_full(e):
        raise
      step, arrays = self._pending
      self._pending = None
      for t in self._threads:  # orbax stops at its first failed write; the others go on
        threading.Thread.join(t, timeout=60)  # (orbax's own join raises the thread's error)
      self._threads = []
      self._remove_unfinished(step)
      self._manager.reload()  # orbax dropped the steps retention deletes after a good save
      older = self.all_steps()
      if older:
        needed = _disk_usage(self.step_path(older[-1]))
        basis = f"step {older[-1]} takes that on disk"
        kept = (f"the older checkpoints (steps {', '.join(map(str, older))}) are intact; run "
                f"the same command to resume from step {older[-1]}")
      else:
        needed, basis = arrays, "its arrays: params, EMA and optimizer state"
        kept = "there is no older checkpoint; run the same command to start again"
      free = shutil.disk_usage(self.directory).free
      raise DiskFull(
          f"no space left on device for the checkpoint of step {step} in {self.directory}: it "
          f"needs about {_size(needed)} ({basis}), {_size(free)} are free there with its "
          f"partial folder removed. Free space (or lower training.keep); {kept}.") from e

  def _remove_unfinished(self, step: int | None = None) -> None:
    """Deletes orbax's folders of unfinished saves (`<step>.orbax-checkpoint-tmp*`: of `step`,
    or of any step) on process 0; a complete checkpoint is never touched."""
    if jax.process_index() != 0 or not self.directory.is_dir():
      return
    for path in self.directory.glob(f"{'*' if step is None else step}{ORBAX_TMP}*"):
      shutil.rmtree(path, ignore_errors=True)
      logger.info("removed %s (a checkpoint whose save did not finish)", path)

  def shape_changes(self, step: int, template: TrainState) -> list[str]:
    """The arrays whose saved shape (the checkpoint's metadata) differs from `template`'s, as
    'params blocks.0.attn_qkv.kernel: saved (32, 96), now (64, 192)'; [] when all match."""
    return [c for item, tree in (("params", ckpt_lib.pure_dict(template.params)),
                                 ("opt_state", template.opt_state))
            for c in ckpt_lib.saved_shape_changes(self.step_path(step), item, tree)]

  def check_shapes(self, step: int, template: TrainState,
                   cfg: ml_collections.ConfigDict | None = None) -> None:
    """Raises ShapeMismatch when step `step`'s saved shapes differ from `template`'s (arrays or
    ShapeDtypeStructs); the message names the config keys that differ between the checkpoint's
    config and `cfg` (when given) and what to do. Reads metadata only.

    Raises:
      UnreadableCheckpoint: a missing item folder or malformed metadata file (`check_files`).
      ShapeMismatch: see above.
    """
    step_dir = self.step_path(step)
    ckpt_lib.check_files(step_dir)
    changes = self.shape_changes(step, template)
    if not changes:
      return
    keys = ""
    if cfg is not None:
      differ = config_lib.diff_values(ckpt_lib.read_config(step_dir), cfg)
      keys = (" Config keys that differ from the checkpoint's: "
              + ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in differ.items()) + ".")
    raise ckpt_lib.ShapeMismatch(
      f"checkpoint {step_dir} holds a model of another shape than this config builds "
      f"({len(changes)} arrays differ, e.g. {changes[0]}).{keys} To resume this run, use the "
      "checkpoint's values; to train this config, start over with --fresh (this run's files "
      "move to <workdir>/old-<time>/) or use another --workdir.")

  def restore(self, step: int, template: TrainState, shardings: TrainState | None = None,
              cfg: ml_collections.ConfigDict | None = None) -> Restored:
    """Loads step `step` into the structure of `template` (placed with `shardings`), after
    `check_shapes(step, template, cfg)` (UnreadableCheckpoint, ShapeMismatch)."""
    step_dir = self.step_path(step)
    self.check_shapes(step, template, cfg)
    sh = shardings if shardings is not None else TrainState(*([None] * 7))
    params_t = ckpt_lib.abstract_arrays(
        ckpt_lib.pure_dict(template.params),
        None if sh.params is None else ckpt_lib.pure_dict(sh.params))
    ema_t = ckpt_lib.abstract_arrays(
        ckpt_lib.pure_dict(template.ema), None if sh.ema is None else ckpt_lib.pure_dict(sh.ema))
    opt_t = ckpt_lib.abstract_arrays(template.opt_state, sh.opt_state)
    r = self._manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(params_t),
      ema=ocp.args.StandardRestore(ema_t),
      opt_state=ocp.args.StandardRestore(opt_t),
      train=ocp.args.JsonRestore(),
      data=ocp.args.JsonRestore(),
      config=ocp.args.JsonRestore(),
    ))
    meta = r.train
    if meta.get("format") != FORMAT or meta.get("step") != step:
      raise ckpt_lib.UnreadableCheckpoint(
          f"{step_dir / 'train'}: {meta!r} does not match step {step} / format {FORMAT}")

    def scalar(v, s):
      a = jnp.asarray(v, jnp.int32)
      return sharding.put_global(a, s) if s is not None else a

    rng = np.asarray(meta["rng"], np.uint32).reshape(np.shape(template.rng))
    state = TrainState(
      step=scalar(step, sh.step),
      params=ckpt_lib.fill(template.params, r.params) if isinstance(template.params, nnx.State)
      else r.params,
      opt_state=r.opt_state,
      ema=ckpt_lib.fill(template.ema, r.ema) if isinstance(template.ema, nnx.State) else r.ema,
      rng=sharding.put_global(rng, sh.rng) if sh.rng is not None else jnp.asarray(rng),
      bad_steps=scalar(meta["bad_steps"], sh.bad_steps),
      skipped=scalar(meta["skipped"], sh.skipped),
    )
    cfg = config_lib.from_dict(r.config) if r.config else None
    return Restored(state=state, data_state=decode_data_state(r.data), step=step, config=cfg,
                    path=self.step_path(step))

  def restore_latest(self, template: TrainState, shardings: TrainState | None = None,
                     cfg: ml_collections.ConfigDict | None = None) -> Restored | None:
    """The newest checkpoint that loads; None if there is none. Unreadable ones are reported
    and, once an older one has loaded, moved aside to `<workdir>/checkpoints_corrupt/`; any other
    error (ShapeMismatch, I/O, memory) is raised at once and nothing is moved. `cfg`, the
    config of this start, lets ShapeMismatch name the keys that differ."""
    steps = self.all_steps()
    if not steps:
      return None
    failed: list[tuple[int, str]] = []
    for step in reversed(steps):
      try:
        restored = self.restore(step, template, shardings, cfg)
      except Exception as e:
        reason = ckpt_lib.unreadable_reason(e)
        if reason is None:
          raise
        logger.error("checkpoint at step %d (%s) cannot be read: %s; trying the previous one",
                     step, self.step_path(step), reason)
        failed.append((step, reason))
        continue
      if failed:
        self._move_aside([s for s, _ in failed])
      return restored
    details = "; ".join(f"step {s} ({self.step_path(s)}): {m}" for s, m in failed)
    raise ckpt_lib.CheckpointError(
        f"no checkpoint in {self.directory} could be read ({details}); nothing was moved. Start "
        "over with --fresh (the files move to <workdir>/old-<time>/) or use another --workdir.")

  def _move_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      dest_root = self.workdir / CORRUPT
      dest_root.mkdir(parents=True, exist_ok=True)
      for step in steps:
        src = self.step_path(step)
        dest = dest_root / f"{step}-{stamp}"
        shutil.move(str(src), str(dest))
        logger.error("moved unusable checkpoint %s to %s", src, dest)
    sharding.barrier("sedd_jax.checkpoint: unusable checkpoints moved aside")
    self._manager.close()
    self._manager = self._make_manager()
