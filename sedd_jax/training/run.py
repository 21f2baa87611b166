"""What a training job holds while it runs (`Run`), and how it is built (`build_run`).

`build_run` is everything between the checks of `loop.train` and the first step: the task's
set-up (`step.setup`), the restore of the newest checkpoint with its data state, `config.json`,
the train iterator, the fixed validation batches, the compiled steps (from a `CompileCache`),
the metrics writer, the task's sample writer, the stop flag and the prefetcher. Compiled steps:
`CompileCache` within a process, `use_persistent_cache` (training.compile_cache) across them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from sedd_jax import config as config_lib
from sedd_jax.data import pipeline
from sedd_jax.training import checkpointer
from sedd_jax.training import metrics as metrics_lib
from sedd_jax.training import runtime
from sedd_jax.training import step as step_lib
from sedd_jax.training import task as task_lib

logger = logging.getLogger("sedd_jax.train")


def use_persistent_cache(path: str) -> str | None:
  """Turns on jax's persistent compilation cache in `path` (`~` expanded), unless `path` is ""
  or jax already has a cache folder (JAX_COMPILATION_CACHE_DIR, or set by the caller, which
  wins). Returns the folder in use, or None (also when jax_enable_compilation_cache is off).
  Later processes with the same shapes, options and jax version load the compiled steps from
  there instead of compiling them."""
  if not jax.config.jax_enable_compilation_cache:
    return None
  current = jax.config.jax_compilation_cache_dir
  if current or not path:
    return current or None
  folder = os.path.expanduser(path)
  jax.config.update("jax_compilation_cache_dir", folder)
  return folder


class CompileCache:
  """Compiled step functions reused within a process for an identical config, mesh and compiler
  options (`get(kind, cfg, mesh, options, build)` calls `build()` once per key)."""

  def __init__(self):
    self._fns: dict[Any, Any] = {}

  def get(self, kind: str, cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
          options: dict, build: Callable[[], Any]) -> Any:
    key = (kind, config_lib.to_json(cfg), tuple(d.id for d in mesh.devices.flat),
           tuple(sorted(options.items())))
    if key not in self._fns:
      self._fns[key] = build()
    return self._fns[key]


COMPILE_CACHE = CompileCache()  # the default of `loop.train`: later jobs of a process reuse it


@dataclasses.dataclass
class Run:
  """The mutable state of a training job between steps (see `build_run`).

  `step` is the host's copy of `state.step`; `data_after` the data state after the last batch
  drawn (what a checkpoint stores); `pending` the metrics of the steps since the last train row;
  `late` the previous step's metrics (its `bad_steps` is read one step late).
  """

  cfg: ml_collections.ConfigDict
  workdir: pathlib.Path
  primary: bool
  built: step_lib.Setup
  ckpt: checkpointer.Checkpointer
  state: Any
  step: int
  total: int
  stop_after: int | None
  data_after: Any
  train_step: Callable
  eval_step: Callable | None
  eval_batches: list[dict]
  write_samples: Callable | None
  writer: metrics_lib.MetricsWriter
  stop: runtime.StopFlag
  prefetch: runtime.Prefetcher
  meter: metrics_lib.Throughput
  last_saved: int | None
  start_step: int = 0
  pending: list[dict] = dataclasses.field(default_factory=list)
  late: dict | None = None
  code: int = 0
  reason: str = "finished"

  @property
  def rest(self) -> Any:
    return self.built.rest

  @property
  def eval_key(self) -> jax.Array:
    return jax.random.PRNGKey(int(self.cfg.seed) + 3)

  @property
  def sample_key(self) -> jax.Array:
    return jax.random.PRNGKey(int(self.cfg.seed) + 4)


def restore(ckpt: checkpointer.Checkpointer, built: step_lib.Setup,
            cfg: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(state, data state) of the newest loadable checkpoint, or the step-0 state and None."""
  restored = ckpt.restore_latest(built.state, built.shardings, cfg)
  if restored is None:
    return built.state, None
  logger.info("resumed from %s (step %d)", restored.path, restored.step)
  if restored.config is not None:
    changed = config_lib.diff(restored.config, cfg)
    if changed:
      logger.warning("config differs from the checkpoint's in: %s", ", ".join(changed))
  return restored.state, restored.data_state


def validation_batches(cfg: ml_collections.ConfigDict, task: task_lib.Task) -> list[dict]:
  """The fixed validation batches ({k: (B / accum, ...) numpy} of `task.batch_keys`), or []
  when neither validation nor samples are on, or the data has no validation split."""
  if cfg.training.eval_every <= 0 and cfg.training.sample_every <= 0:
    return []
  eval_bs = cfg.training.batch_size // cfg.training.accum
  batches = []
  try:
    valid_it = pipeline.make_iterator(cfg, "valid", eval_bs, int(cfg.seed))
    for _ in range(max(1, cfg.training.eval_batches)):
      b = next(valid_it)
      batches.append({k: np.asarray(b[k]) for k in task.batch_keys})
  except (ValueError, OSError, StopIteration) as e:
    logger.warning("no validation batches (%s): validation loss disabled", e)
    return []
  return batches


def _log_start(built: step_lib.Setup, devices: Sequence[Any], step: int, total: int) -> None:
  cfg, n = built.cfg, built.n_params
  logger.info("task %s, model: %s parameters (%.1f M); %d devices (%s), mesh %s; fsdp %s; batch "
              "%d (accum %d); %d -> %d steps", built.task.name, f"{n:,}", n / 1e6,
              len(devices), devices[0].platform, dict(built.mesh.shape), cfg.training.fsdp,
              cfg.training.batch_size, cfg.training.accum, step, total)


def build_run(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, primary: bool,
              ckpt: checkpointer.Checkpointer, task: task_lib.Task, devices: Sequence[Any],
              stop_after: int | None, compiler_options: dict | None,
              cache: CompileCache) -> Run:
  """Model, restored state, data, compiled steps and writers of a job (see the module doc)."""
  built = step_lib.setup(cfg, devices, task=task)
  state, data_state = restore(ckpt, built, cfg)  # a changed model shape stops here
  if primary:
    (workdir / "config.json").write_text(config_lib.to_json(cfg))
  step, total = int(jax.device_get(state.step)), int(cfg.training.steps)
  _log_start(built, devices, step, total)
  # Data: the same global batches on every process (see `sedd_jax.train`).
  train_it = pipeline.make_iterator(cfg, "train", cfg.training.batch_size, int(cfg.seed))
  if data_state is not None:
    train_it.set_state(data_state)
  eval_batches = validation_batches(cfg, task)
  opts = dict(compiler_options or {})
  train_step = cache.get("train", cfg, built.mesh, opts, lambda: built.train_step(opts or None))
  eval_step = None
  if cfg.training.eval_every > 0 and eval_batches:
    eval_step = cache.get("eval", cfg, built.mesh, opts, lambda: built.eval_step(opts or None))
  writer = metrics_lib.MetricsWriter(workdir, cfg, primary=primary, start_step=step)
  write_samples = None
  if cfg.training.sample_every > 0 and cfg.training.num_samples > 0:
    write_samples = task.sample_hook(built, opts, cache, writer, workdir, primary)
  stop = runtime.StopFlag(ckpt.directory)  # the newest checkpoint a second Ctrl-C names
  stop.install()
  return Run(cfg=cfg, workdir=workdir, primary=primary, built=built, ckpt=ckpt, state=state,
             step=step, total=total, stop_after=stop_after, data_after=data_state,
             train_step=train_step, eval_step=eval_step, eval_batches=eval_batches,
             write_samples=write_samples, writer=writer, stop=stop,
             prefetch=runtime.Prefetcher(train_it, built.put_batch, task.count_tokens),
             meter=metrics_lib.Throughput(step), last_saved=ckpt.latest_step(), start_step=step)
