"""The training job as a library: `train(cfg, workdir) -> Result` (the CLI is `sedd_jax.train`).

  train      checks (config, workdir, data inputs), the workdir's lock (`workdir.lock`), the
             checkpoint's model shape before the finished check and the model, then
             `run.build_run`, `run_steps`, `finish`
  run_steps  the step loop: stop checks, one step, `hooks.after_step`
  finish     the last train row, the final checkpoint, closing, the loss curve

Multi-process semantics (see `sedd_jax.train`): every process checks the workdir and the data
inputs; process 0 alone takes the workdir's lock and prepares it, then all learn whether that
worked (one collective: a failure stops all of them); `StopFlag.agreed` is called by every
process at the same steps (every `StopFlag.CHECK_EVERY` steps: a collective).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from typing import Any, Sequence

import jax
import ml_collections

from sedd_jax import config as config_lib
from sedd_jax.data import pipeline
from sedd_jax.training import checkpoint as ckpt_lib
from sedd_jax.training import checkpointer
from sedd_jax.training import hooks
from sedd_jax.training import metrics as metrics_lib
from sedd_jax.training import runtime
from sedd_jax.training import state as state_lib
from sedd_jax.training import task as task_lib
from sedd_jax.training import workdir as workdir_lib
from sedd_jax.training.run import COMPILE_CACHE
from sedd_jax.training.run import CompileCache
from sedd_jax.training.run import Run
from sedd_jax.training.run import build_run
from sedd_jax.training.run import use_persistent_cache

logger = logging.getLogger("sedd_jax.train")

EXIT_OK = 0
EXIT_NONFINITE = hooks.EXIT_NONFINITE


@dataclasses.dataclass
class Result:
  """What `train` did: exit code, final step, and why it stopped."""

  code: int
  step: int
  reason: str


def _check_resume_shapes(ckpt: checkpointer.Checkpointer, latest: int | None,
                         cfg: ml_collections.ConfigDict, task: task_lib.Task) -> None:
  """ShapeMismatch (naming the keys) when the newest checkpoint has another model shape."""
  if latest is None:
    return
  try:
    ckpt.check_shapes(latest, state_lib.abstract_state(
      cfg, task.build_model, task.wrap_optimizer(state_lib.make_optimizer(cfg))), cfg)
  except ckpt_lib.UnreadableCheckpoint:
    pass  # restore_latest reports it and falls back to an older checkpoint


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, fresh: bool = False,
          stop_after: int | None = None, devices: Sequence[Any] | None = None,
          compiler_options: dict | None = None, cache: CompileCache | None = None) -> Result:
  """Runs (or resumes) a training job; the library form of the CLI.

  Args:
    cfg: a config (validated here, before anything is compiled).
    workdir: the run's folder (one job at a time: see `workdir.lock`).
    fresh: start over (see `sedd_jax.train`).
    stop_after: stop, with a checkpoint, after this many steps of THIS invocation (tests use it
      to simulate an interruption).
    devices: the devices of the mesh (default all).
    compiler_options: XLA options for the compiled steps (tests: faster CPU compilation).
    cache: where compiled steps are kept (default `run.COMPILE_CACHE`, shared by the jobs of a
      process).

  Returns:
    Result(code, step, reason); code 0 when finished or stopped by a signal, 3 after too many
    non-finite steps.

  Raises:
    workdir.WorkdirError: an unusable workdir (a file, a data store, holding the data inputs,
      not writable) or one in use by another job, before anything is written there.
  """
  devices = list(jax.devices() if devices is None else devices)
  config_lib.validate(cfg, n_devices=len(devices))
  cache_dir = use_persistent_cache(cfg.training.compile_cache)
  if cache_dir:
    logger.info("persistent compilation cache: %s", cache_dir)
  workdir = pathlib.Path(workdir).absolute()
  primary = jax.process_index() == 0
  workdir_lib.check(workdir, cfg, fresh)
  pipeline.ensure_prepared(cfg)  # bad data inputs fail before the workdir is written
  lock = _claim(workdir, fresh, primary)
  try:
    return _train(cfg, workdir, primary, devices, stop_after, compiler_options,
                  COMPILE_CACHE if cache is None else cache)
  finally:
    if lock is not None:
      lock.release()


def _claim(workdir: pathlib.Path, fresh: bool, primary: bool) -> workdir_lib.Lock | None:
  """Process 0 locks the workdir and prepares it (`--fresh`); then every process learns
  whether that worked (`runtime.process_max`, the barrier before anything else is written), so
  that a failure stops all of them instead of leaving the others waiting. Returns process 0's
  lock (None elsewhere)."""
  lock, error = None, None
  if primary:
    try:
      lock = workdir_lib.lock(workdir)
      workdir_lib.prepare(workdir, fresh)
    except Exception as e:  # noqa: BLE001 -- raised below, after the other processes hear of it
      error = e
  if runtime.process_max(error is not None):
    if lock is not None:
      lock.release()
    raise error or workdir_lib.WorkdirError(
        f"process 0 could not take the workdir {workdir} (its log says why)")
  return lock


def _train(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, primary: bool,
           devices: list[Any], stop_after: int | None, compiler_options: dict | None,
           cache: CompileCache) -> Result:
  """`train` in its claimed workdir: the checkpoint checks, then build, steps, finish."""
  total = int(cfg.training.steps)
  ckpt = checkpointer.Checkpointer(workdir, keep=cfg.training.keep,
                                   milestone_every=cfg.training.milestone_every)
  try:
    task = task_lib.get_task(cfg)  # fills derived keys (the ligand vocabulary) before the save
    latest = ckpt.latest_step()
    _check_resume_shapes(ckpt, latest, cfg, task)  # before the finished check and the model
    done = latest is not None and latest >= total
    run = None if done else build_run(cfg, workdir, primary, ckpt, task, devices, stop_after,
                                      compiler_options, cache)
  except BaseException:
    ckpt.close()  # a failed set-up (a changed model shape, bad data) leaves nothing open
    raise
  if run is None:
    logger.info("%s is already at step %d (training.steps = %d): nothing to do. Raise "
                "--config.training.steps to train further, or use --fresh to start over.",
                workdir, latest, total)
    ckpt.close()
    return Result(EXIT_OK, latest, "done")
  try:
    run_steps(run)
    finish(run)
  finally:
    close(run)
  return Result(run.code, run.step, run.reason)


def _stop_reason(run: Run) -> str | None:
  """Why the loop stops before the next step (a signal to any process, `stop_after`), or None.
  A collective with several processes: every process calls it at the same step."""
  signalled = run.stop.agreed(run.step)
  if signalled:
    return f"stopped by {signalled}"
  if run.stop_after is not None and run.step - run.start_step >= run.stop_after:
    return "stop_after"
  return None


def run_steps(run: Run) -> None:
  """The step loop, from `run.step` to `run.total` or a stop (sets `run.reason`, `run.code`)."""
  t_start = time.perf_counter()
  if run.step == 0 and run.eval_step is not None and run.stop_after != 0:
    hooks.evaluate(run)
    t_start = time.perf_counter()
  while run.step < run.total:
    reason = _stop_reason(run)
    if reason:
      run.reason = reason
      return
    batch, run.data_after, padded, real = run.prefetch.next()
    run.state, m = run.train_step(run.state, run.rest, batch)
    run.step += 1
    run.meter.add_tokens(padded, real)
    run.pending.append(m)
    if run.step == run.start_step + 1:
      jax.block_until_ready(m)
      logger.info("first step done in %.1f s (compilation included)",
                  time.perf_counter() - t_start)
      run.meter.reset(run.step)
    if hooks.after_step(run, m):
      return


def finish(run: Run) -> None:
  """The last train row; for a run that did not fail, the final checkpoint; every checkpoint
  waited for (a full disk stops here: `checkpointer.DiskFull`); the unigram baseline row (once
  per run folder); the end event."""
  if run.pending:
    hooks.log_train(run)
  if run.code == EXIT_OK:
    hooks.save(run, run.reason)
  run.ckpt.wait()
  if run.code == EXIT_OK:
    if run.reason == "finished":
      logger.info("finished: step %d of %d", run.step, run.total)
    else:
      logger.info("%s at step %d; checkpoint written; run the same command to resume",
                  run.reason, run.step)
  hooks.write_baseline(run)
  run.writer.event(run.step, run.reason)


def close(run: Run) -> None:
  """Signal handlers, prefetch thread, checkpoints (waited for), writer; the loss curve."""
  run.stop.uninstall()
  run.prefetch.close()
  run.ckpt.wait()
  run.ckpt.close()
  run.writer.close()
  if not run.primary:
    return
  try:
    title = f"variant {run.cfg.variant}, workdir {run.workdir.name}"
    png = metrics_lib.plot_loss_curve(run.workdir / metrics_lib.METRICS_FILE,
                                      run.workdir / metrics_lib.LOSS_CURVE_FILE, title=title)
    if png:
      logger.info("loss curve: %s", png)
  except Exception as e:  # noqa: BLE001 -- a plot must not hide the real outcome
    logger.warning("could not plot the loss curve: %s", e)
