"""The training job as a library: `train(cfg, workdir) -> Result` (the CLI is `sedd_jax.train`).

  train      checks (config, data inputs, the checkpoint's model shape) before the model is
             built, then `run.build_run`, `run_steps`, `finish`
  run_steps  the step loop: stop checks, one step, `hooks.after_step`
  finish     the last train row, the final checkpoint, closing, the loss curve

Multi-process semantics (see `sedd_jax.train`): every process checks the data inputs; process 0
alone prepares the workdir, then all meet at a barrier; `StopFlag.agreed` is called by every
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
from sedd_jax.training import sharding
from sedd_jax.training import state as state_lib
from sedd_jax.training import task as task_lib
from sedd_jax.training.run import COMPILE_CACHE
from sedd_jax.training.run import CompileCache
from sedd_jax.training.run import Run
from sedd_jax.training.run import build_run

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
    workdir: the run's folder.
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
  """
  devices = list(jax.devices() if devices is None else devices)
  config_lib.validate(cfg, n_devices=len(devices))
  workdir = pathlib.Path(workdir).absolute()
  primary = jax.process_index() == 0
  pipeline.ensure_prepared(cfg)  # bad data inputs fail before the workdir is written
  if primary:
    runtime.prepare_workdir(workdir, fresh)
  sharding.barrier("sedd_jax.train: workdir and data ready")
  total = int(cfg.training.steps)
  ckpt = checkpointer.Checkpointer(workdir, keep=cfg.training.keep,
                               milestone_every=cfg.training.milestone_every)
  latest = ckpt.latest_step()
  if latest is not None and latest >= total:
    logger.info("%s is already at step %d (training.steps = %d): nothing to do. Raise "
                "--config.training.steps to train further, or use --fresh to start over.",
                workdir, latest, total)
    ckpt.close()
    return Result(EXIT_OK, latest, "done")
  try:
    task = task_lib.get_task(cfg)  # fills derived keys (the ligand vocabulary) before the save
    _check_resume_shapes(ckpt, latest, cfg, task)  # before the model is built
    run = build_run(cfg, workdir, primary, ckpt, task, devices, stop_after, compiler_options,
                    COMPILE_CACHE if cache is None else cache)
  except BaseException:
    ckpt.close()  # a failed set-up (a changed model shape, bad data) leaves nothing open
    raise
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
  """The last train row; for a run that did not fail, the final checkpoint; the end event."""
  if run.pending:
    hooks.log_train(run)
  if run.code == EXIT_OK:
    hooks.save(run, run.reason)
    if run.reason == "finished":
      logger.info("finished: step %d of %d", run.step, run.total)
    else:
      logger.info("%s at step %d; checkpoint written; run the same command to resume",
                  run.reason, run.step)
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
