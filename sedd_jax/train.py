r"""Training CLI: `python -m sedd_jax.train --config=configs/uniref50.py[:variant] [flags]`.

  python -m sedd_jax.train --config=configs/uniref50.py:tiny --workdir runs/tiny
  python -m sedd_jax.train --config=configs/uniref50.py:small --workdir runs/small \
      --config.training.batch_size=128 --config.optim.lr=1e-4
  python -m sedd_jax.train --config=configs/protein_ligand.py:tiny --workdir runs/pl_tiny

The config's `task` (default "sedd") picks the model and loss (`sedd_jax.training.task`): the
protein-only SEDD of configs/uniref50.py, or the protein-ligand model of
configs/protein_ligand.py (`task = "protein_ligand"`; its ligand vocabulary is filled into the
saved config).

Flags: `--config=FILE[:VARIANT]` (variant default: the file's `get_config()` default, `tiny` for
uniref50.py), `--config.KEY=VALUE` overrides (unknown keys and bad values fail before anything is
compiled, naming the key), `--workdir DIR` (default `runs/<variant>`), `--fresh`.

Workdir: `checkpoints/<step>/` (see `sedd_jax.training.checkpoint`), `metrics.jsonl`,
`config.json` (the config of the latest start), `samples/step_<n>.fasta` (protein-ligand:
`samples/step_<n>.smi`, ligands for validation proteins, with their SMILES validity logged as a
`sample` row), `loss_curve.png`, `wandb/`. Starting resumes from the newest loadable
checkpoint; if it is already at `training.steps` the job says so and exits 0. A config that
changes the model's shape stops before the model is built, naming the keys that differ from the
checkpoint's. `--fresh` starts from step 0 WITHOUT deleting anything: the workdir's current
content is moved into `<workdir>/old-<YYYYmmdd-HHMMSS>/`. Bad data inputs (`data.fasta` missing,
a store of another source) stop the job before the workdir is written. Exit codes: 0 (finished,
stopped by a signal, or --help), 2 (bad config, data or checkpoint: one error line), 3
(non-finite steps).

Stopping: SIGTERM or Ctrl-C (SIGINT) sets a flag; the loop finishes the current step, writes a
checkpoint and exits 0 (a second Ctrl-C aborts at once). `training.max_bad_steps` consecutive
non-finite steps stop the run with a checkpoint and exit code 3.

Devices: all devices of all processes form one data-parallel mesh (`sedd_jax.training.step`).
Multi-process: when `JAX_COORDINATOR_ADDRESS` is set (with `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`), or under SLURM with more than one task (`SLURM_NTASKS` > 1),
`jax.distributed.initialize()` is called first. Every process then draws the same global batches
from the data (its iterator state is the same everywhere) and hands only its devices' rows to
them (`step.put_batch`), so the losses, the checkpointed data state and resuming do not depend
on the number of processes or devices (a run saved on 2 GPUs resumes on 1 and the reverse).
Every process checks (and the first one to get there prepares) the data store before anything
is written; process 0 alone moves the workdir aside (`--fresh`, then a barrier) and
writes metrics, samples and `config.json`; every process writes its shards of each checkpoint
(orbax). A signal to any process stops all of them after the same step: the flags are
gathered from every process before each step (`StopFlag.agreed`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from sedd_jax import config as config_lib

logger = logging.getLogger("sedd_jax.train")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_NONFINITE = 3


# ----------------------------------------------------------------------------------------------
# Environment.


def maybe_initialize_distributed() -> bool:
  """Calls jax.distributed.initialize() when the environment describes a multi-process job."""
  import jax  # noqa: PLC0415

  env = os.environ
  multi_slurm = "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1
  if "JAX_COORDINATOR_ADDRESS" not in env and not multi_slurm:
    return False
  kwargs = {}
  if "JAX_NUM_PROCESSES" in env:
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if "JAX_PROCESS_ID" in env:
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  logger.info("jax.distributed: process %d of %d, %d local / %d global devices",
              jax.process_index(), jax.process_count(), jax.local_device_count(),
              jax.device_count())
  return True


def prepare_workdir(workdir: pathlib.Path, fresh: bool) -> None:
  """Creates the workdir; with `fresh`, moves its content to `old-<timestamp>/` (never deletes)."""
  workdir.mkdir(parents=True, exist_ok=True)
  if not fresh:
    return
  entries = [p for p in workdir.iterdir() if not p.name.startswith("old-")]
  if not entries:
    return
  dest = workdir / f"old-{time.strftime('%Y%m%d-%H%M%S')}"
  n = 0
  while dest.exists():
    n += 1
    dest = workdir / f"old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
  dest.mkdir()
  for p in entries:
    p.rename(dest / p.name)
  logger.info("--fresh: moved the previous content of %s to %s", workdir, dest)


class StopFlag:
  """Set by SIGTERM / SIGINT; the training loop asks `agreed()` between steps."""

  def __init__(self):
    self.reason: str | None = None
    self.signum = 0
    self._previous: dict[int, Any] = {}

  def __bool__(self) -> bool:
    return self.reason is not None

  def agreed(self) -> str | None:
    """The signal's name if this or ANY other process received one, else None.

    With several processes this is a collective (an all-gather of the signal numbers): every
    process must call it at the same step, and all get the same answer.
    """
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    if jax.process_count() == 1:
      return self.reason
    signum = int(multihost_utils.process_allgather(np.int32(self.signum)).max())
    return signal.Signals(signum).name if signum else None

  def _handler(self, signum, frame):
    name = signal.Signals(signum).name
    if self.reason is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: abort at once
    self.reason, self.signum = name, int(signum)
    logger.warning("%s received: finishing the current step, then checkpointing and stopping "
                   "(Ctrl-C again aborts without a checkpoint)", name)

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handler)

  def uninstall(self) -> None:
    for sig, old in self._previous.items():
      signal.signal(sig, old)
    self._previous.clear()


class Prefetcher:
  """Pulls host batches in a background thread and puts them on the devices one step ahead.

  Yields (device_batch, data_state_after, padded_tokens, real_tokens), where
  `data_state_after` is the iterator's `get_state()` right after this batch was drawn (what a
  checkpoint taken after training on it must store); `count(batch) -> (padded, real)`.
  """

  def __init__(self, iterator, put: Callable[[dict], dict],
               count: Callable[[dict], tuple[Any, Any]], depth: int = 2):
    self._it = iterator
    self._put = put
    self._count = count
    self._q: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
    self._thread.start()

  def _run(self):
    try:
      while not self._stop.is_set():
        batch = next(self._it)
        state = self._it.get_state()
        padded, real = self._count(batch)
        item = (self._put(batch), state, float(padded), float(real))
        while not self._stop.is_set():
          try:
            self._q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer
      self._q.put(e)

  def next(self):
    item = self._q.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)


# ----------------------------------------------------------------------------------------------
# Training job.


@dataclasses.dataclass
class Result:
  """What `train` did: exit code, final step, and why it stopped."""

  code: int
  step: int
  reason: str


_STEP_CACHE: dict[Any, Any] = {}


def _cached(kind: str, cfg, mesh, options: dict, build: Callable[[], Any]):
  """Reuses compiled step functions within a process for an identical config and mesh."""
  key = (kind, config_lib.to_json(cfg), tuple(d.id for d in mesh.devices.flat),
         tuple(sorted(options.items())))
  if key not in _STEP_CACHE:
    _STEP_CACHE[key] = build()
  return _STEP_CACHE[key]


def train(cfg, workdir: str | os.PathLike, fresh: bool = False, stop_after: int | None = None,
          devices: Sequence[Any] | None = None,
          compiler_options: dict | None = None) -> Result:
  """Runs (or resumes) a training job; the library form of the CLI.

  Args:
    cfg: a config (validated here, before anything is compiled).
    workdir: the run's folder.
    fresh: start over (see the module docstring).
    stop_after: stop, with a checkpoint, after this many steps of THIS invocation (tests use it
      to simulate an interruption).
    devices: the devices of the mesh (default all).
    compiler_options: XLA options for the compiled steps (tests: faster CPU compilation).

  Returns:
    Result(code, step, reason); code 0 when finished or stopped by a signal, 3 after too many
    non-finite steps.
  """
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from sedd_jax.data import pipeline  # noqa: PLC0415
  from sedd_jax.training import checkpoint as ckpt_lib  # noqa: PLC0415
  from sedd_jax.training import metrics as metrics_lib  # noqa: PLC0415
  from sedd_jax.training import state as state_lib  # noqa: PLC0415
  from sedd_jax.training import step as step_lib  # noqa: PLC0415
  from sedd_jax.training import task as task_lib  # noqa: PLC0415

  devices = list(jax.devices() if devices is None else devices)
  config_lib.validate(cfg, n_devices=len(devices))
  workdir = pathlib.Path(workdir).absolute()
  primary = jax.process_index() == 0
  pipeline.ensure_prepared(cfg)  # bad data inputs fail before the workdir is written
  if primary:
    prepare_workdir(workdir, fresh)
  step_lib.barrier("sedd_jax.train: workdir and data ready")
  total = int(cfg.training.steps)

  ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.training.keep,
                               milestone_every=cfg.training.milestone_every)
  latest = ckpt.latest_step()
  if latest is not None and latest >= total:
    logger.info("%s is already at step %d (training.steps = %d): nothing to do. Raise "
                "--config.training.steps to train further, or use --fresh to start over.",
                workdir, latest, total)
    ckpt.close()
    return Result(EXIT_OK, latest, "done")
  task = task_lib.get_task(cfg)  # fills derived keys (the ligand vocabulary) before the save
  if latest is not None:  # a changed model shape stops here, before the model is built
    try:
      ckpt.check_shapes(latest, state_lib.abstract_state(
        cfg, task.build_model, task.wrap_optimizer(state_lib.make_optimizer(cfg))), cfg)
    except ckpt_lib.UnreadableCheckpoint:
      pass  # restore_latest reports it and falls back to an older checkpoint
    except ckpt_lib.ShapeMismatch:
      ckpt.close()
      raise

  # Model, optimizer, state.
  built = step_lib.setup(cfg, devices, task=task)
  state, shardings, rest = built.state, built.shardings, built.rest
  mesh, n_params = built.mesh, built.n_params

  data_state = None
  restored = ckpt.restore_latest(state, shardings, cfg)  # a changed model shape stops here
  if restored is not None:
    state, data_state = restored.state, restored.data_state
    logger.info("resumed from %s (step %d)", restored.path, restored.step)
    if restored.config is not None:
      changed = config_lib.diff(restored.config, cfg)
      if changed:
        logger.warning("config differs from the checkpoint's in: %s", ", ".join(changed))
  if primary:
    (workdir / "config.json").write_text(config_lib.to_json(cfg))
  step = int(jax.device_get(state.step))
  logger.info("task %s, model: %s parameters (%.1f M); %d devices (%s), mesh %s; fsdp %s; batch "
              "%d (accum %d); %d -> %d steps", task.name, f"{n_params:,}", n_params / 1e6,
              len(devices), devices[0].platform, dict(mesh.shape), cfg.training.fsdp,
              cfg.training.batch_size, cfg.training.accum, step, total)

  # Data: the same global batches on every process (see the module docstring).
  train_it = pipeline.make_iterator(cfg, "train", cfg.training.batch_size, int(cfg.seed))
  if data_state is not None:
    train_it.set_state(data_state)
  eval_batches = []
  if cfg.training.eval_every > 0 or cfg.training.sample_every > 0:
    eval_bs = cfg.training.batch_size // cfg.training.accum
    try:
      valid_it = pipeline.make_iterator(cfg, "valid", eval_bs, int(cfg.seed))
      for _ in range(max(1, cfg.training.eval_batches)):
        b = next(valid_it)
        eval_batches.append({k: np.asarray(b[k]) for k in task.batch_keys})
    except (ValueError, OSError, StopIteration) as e:
      logger.warning("no validation batches (%s): validation loss disabled", e)
      eval_batches = []

  # Compiled functions.
  opts = dict(compiler_options or {})
  train_step = _cached("train", cfg, mesh, opts, lambda: built.train_step(opts or None))
  eval_step = None
  if cfg.training.eval_every > 0 and eval_batches:
    eval_step = _cached("eval", cfg, mesh, opts, lambda: built.eval_step(opts or None))
  writer = metrics_lib.MetricsWriter(workdir, cfg, primary=primary)
  write_samples = None
  if cfg.training.sample_every > 0 and cfg.training.num_samples > 0:
    write_samples = SAMPLE_WRITERS[task.name](built, opts, writer, workdir, primary)

  stop = StopFlag()
  stop.install()
  prefetch = Prefetcher(train_it, built.put_batch, task.count_tokens)
  meter = metrics_lib.Throughput(step)
  pending: list[dict] = []
  late = None  # the previous step's metrics
  last_saved = ckpt.latest_step()
  data_after = data_state
  reason = "finished"
  code = EXIT_OK
  start_step = step
  eval_key = jax.random.PRNGKey(int(cfg.seed) + 3)
  sample_key = jax.random.PRNGKey(int(cfg.seed) + 4)

  def save(why: str):
    nonlocal last_saved
    if last_saved == step:
      return
    ckpt.save(state, data_after, cfg)
    last_saved = step
    logger.info("checkpoint at step %d (%s)", step, why)

  def flush_train_row():
    vals = jax.device_get(pending)
    pending.clear()
    finite = [v for v in vals if bool(v["finite"])]
    use = finite or vals
    row = {
      "loss": float(np.mean([v["loss"] for v in use])),
      "loss_per_token": float(np.mean([v["loss_per_token"] for v in use])),
      "grad_norm": float(np.mean([v["grad_norm"] for v in use])),
      "lr": float(vals[-1]["lr"]),
      "skipped": int(vals[-1]["skipped"]),
    }
    for k in vals[-1]:  # the task's extra metrics; NaN = not measured in that step
      if k not in STEP_METRICS:
        xs = np.asarray([v[k] for v in use], np.float64)
        if np.isfinite(xs).any():
          row[k] = float(np.nanmean(xs))
    row.update(meter.measure(step))
    row["eta_s"] = row["step_time"] * (total - step)
    writer.train(step, row)

  t_start = time.perf_counter()
  try:
    if step == 0 and eval_step is not None and stop_after != 0:
      _evaluate(eval_step, state, rest, eval_batches, built.put_batch, eval_key, writer, step)
      t_start = time.perf_counter()
    while step < total:
      signalled = stop.agreed()
      if signalled:
        reason = f"stopped by {signalled}"
        break
      if stop_after is not None and step - start_step >= stop_after:
        reason = "stop_after"
        break
      batch, data_after, padded, real = prefetch.next()
      state, m = train_step(state, rest, batch)
      step += 1
      meter.add_tokens(padded, real)
      pending.append(m)
      if step == start_step + 1:
        jax.block_until_ready(m)
        logger.info("first step done in %.1f s (compilation included)",
                    time.perf_counter() - t_start)
        meter.reset(step)
      # No per-step device-to-host stall: the previous step's bad_steps is read once this step
      # is queued; during a bad streak (or with max_bad_steps 1) this step's is read at once, so
      # the non-finite stop lands on the exact step.
      bad = int(jax.device_get(late["bad_steps"])) if late is not None else 0
      if bad or cfg.training.max_bad_steps <= 1:
        bad = int(jax.device_get(m["bad_steps"]))
      late = m
      if step % cfg.training.log_every == 0 or step == total or bad:
        flush_train_row()
      if bad >= cfg.training.max_bad_steps:
        code, reason = EXIT_NONFINITE, "non-finite"
        save("non-finite")
        logger.error("stopping: %d consecutive steps with a non-finite loss or gradient (up to "
                     "step %d; training.max_bad_steps = %d). The checkpoint at step %d holds the "
                     "last good parameters. Lower optim.lr, raise optim.warmup or check the data.",
                     bad, step, cfg.training.max_bad_steps, step)
        writer.event(step, "stopped: non-finite", bad_steps=bad)
        break
      paused = False
      if eval_step is not None and step % cfg.training.eval_every == 0:
        _evaluate(eval_step, state, rest, eval_batches, built.put_batch, eval_key, writer, step)
        paused = True
      if write_samples is not None and step % cfg.training.sample_every == 0:
        write_samples(state, eval_batches, jax.random.fold_in(sample_key, step), step)
        paused = True
      if step % cfg.training.ckpt_every == 0 or (
          cfg.training.milestone_every and step % cfg.training.milestone_every == 0):
        save("periodic")
        paused = True
      if paused:
        meter.reset(step)
    if pending:
      flush_train_row()
    if code == EXIT_OK:
      save(reason)
      if reason == "finished":
        logger.info("finished: step %d of %d", step, total)
      else:
        logger.info("%s at step %d; checkpoint written; run the same command to resume", reason,
                    step)
    writer.event(step, reason)
  finally:
    stop.uninstall()
    prefetch.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    if primary:
      try:
        png = metrics_lib.plot_loss_curve(workdir / metrics_lib.METRICS_FILE,
                                          workdir / metrics_lib.LOSS_CURVE_FILE,
                                          title=f"variant {cfg.variant}, workdir {workdir.name}")
        if png:
          logger.info("loss curve: %s", png)
      except Exception as e:  # noqa: BLE001 -- a plot must not hide the real outcome
        logger.warning("could not plot the loss curve: %s", e)
  return Result(code, step, reason)


def _evaluate(eval_step, state, rest, batches, put, key, writer, step):
  """Validation losses of the EMA parameters over the fixed validation batches: the eval step's
  sums (`task.eval_loss`) over all batches, per sequence (`valid_<name>`) and, for the loss, per
  real token."""
  import jax  # noqa: PLC0415

  totals: dict[str, float] = {}
  for i, b in enumerate(batches):
    sums = jax.device_get(eval_step(state.ema, rest, put(b), jax.random.fold_in(key, i)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  seqs, toks = max(totals.pop("n_seqs"), 1.0), max(totals.pop("n_tokens"), 1.0)
  row = {"valid_loss": totals["loss"] / seqs, "valid_loss_per_token": totals["loss"] / toks}
  row.update({f"valid_{k}": v / seqs for k, v in totals.items() if k != "loss"})
  writer.eval(step, row)


def _host_value(x):
  """The full value of the jax.Array `x` as numpy on every process (gathered from the other
  processes when it is sharded across them)."""
  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return multihost_utils.process_allgather(x)


# Periodic samples during training, one writer per task: `SAMPLE_WRITERS[task.name](built,
# compiler_options, metrics_writer, workdir, primary)` returns `write(state, validation batches,
# key, step)`, which samples with the EMA weights and writes `<workdir>/samples/step_<step>.*`.
# Every process runs the sampler on the same global inputs (a collective); process 0 writes.


def _protein_sample_writer(built, options, writer, workdir, primary):
  """SEDD: `num_samples` proteins, lengths from the validation batches -> step_<n>.fasta."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from sedd_jax.data import tokenizers  # noqa: PLC0415
  from sedd_jax.sampling import sampler as sampler_lib  # noqa: PLC0415
  cfg, graph, noise = built.cfg, built.task.graph, built.task.noise
  n, L = int(cfg.training.num_samples), int(cfg.model.length)
  allowed = jnp.asarray(tokenizers.residue_mask(graph.dim))

  def run(ema, rest, key, lengths):
    model = nnx.merge(built.defs.eval, ema, rest)
    return sampler_lib.sample(key, sampler_lib.model_score_fn(model), graph, noise, (n, L),
                              steps=int(cfg.sampling.steps), predictor=str(cfg.sampling.predictor),
                              eps=float(cfg.sampling.eps), lengths=lengths, allowed=allowed)

  replicated = jax.sharding.NamedSharding(built.mesh, jax.sharding.PartitionSpec())
  sample_fn = _cached("sample", cfg, built.mesh, options,
                      lambda: jax.jit(run, out_shardings=replicated,
                                      compiler_options=options or None))

  def write(state, batches, key, step):
    if batches:
      pool = np.concatenate([b["lengths"] for b in batches])
      lengths = np.resize(pool, n).astype(np.int32)
    else:
      lengths = np.full((n,), L, np.int32)
    t0 = time.perf_counter()
    tokens = np.asarray(jax.device_get(sample_fn(state.ema, built.rest, key, lengths)))
    if not primary:
      return
    tok = tokenizers.ProteinTokenizer()
    out = pathlib.Path(workdir) / "samples" / f"step_{step}.fasta"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
      seq = tok.decode(tokens[i, :lengths[i]])
      lines.append(f">sample_{i} step={step} length={len(seq)}\n{seq}\n")
    out.write_text("".join(lines))
    logger.info("step %d: %d samples (%.1f s) -> %s; first: %s", step, n,
                time.perf_counter() - t0, out, lines[0].split("\n")[1][:60] if lines else "")

  return write


def _ligand_sample_writer(built, options, writer, workdir, primary):
  """Protein-ligand: ligands given the first `num_samples` validation proteins (target lengths
  = their reference ligands') -> step_<n>.smi (`SMILES<TAB>name`), SMILES validity logged as a
  `sample` row (`smiles_validity`, checked by RDKit if installed, else by grammar)."""
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from sedd_jax.data import pipeline  # noqa: PLC0415
  from sedd_jax.data import store as store_lib  # noqa: PLC0415
  from sedd_jax.protein_ligand import modes  # noqa: PLC0415

  del options  # sample_ligand_given_protein is compiled (and cached) by nnx.jit
  cfg, n = built.cfg, int(built.cfg.training.num_samples)
  smiles_tok = store_lib.Store(pipeline.resolve_path(cfg.data.prepared), "train").smiles_tokenizer()
  checker, is_valid = modes.validity_checker()

  def write(state, batches, key, step):
    if not batches:
      logger.warning("step %d: no validation pairs to condition on; no ligand samples", step)
      return
    pool = {k: np.concatenate([b[k] for b in batches])[:n] for k in modes.BATCH_KEYS}
    t0 = time.perf_counter()
    model = nnx.merge(built.defs.eval, state.ema, built.rest)
    ligands = _host_value(modes.sample_ligand_given_protein(
      key, model, cfg, pool["tokens"], pool["lengths"], pool["ligand_lengths"]))
    if not primary:
      return
    smiles = [smiles_tok.decode(ligands[i, :pool["ligand_lengths"][i]])
              for i in range(len(ligands))]
    valid = [bool(is_valid(x)) for x in smiles]
    out = pathlib.Path(workdir) / "samples" / f"step_{step}.smi"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{x}\tvalid_protein_{i} step={step} valid={int(v)}\n"
                           for i, (x, v) in enumerate(zip(smiles, valid))))
    validity = sum(valid) / max(len(valid), 1)
    writer.write("sample", step, {"smiles_validity": validity, "checker": checker,
                                  "num_samples": len(smiles)})
    logger.info("step %d: %d ligands given validation proteins (%.1f s) -> %s; SMILES validity "
                "%.2f (%s); first: %s", step, len(smiles), time.perf_counter() - t0, out,
                validity, checker, smiles[0][:60] if smiles else "")

  return write


SAMPLE_WRITERS = {"sedd": _protein_sample_writer, "protein_ligand": _ligand_sample_writer}
# Step metrics that are not a task's extra metrics (see `flush_train_row` in `train`).
STEP_METRICS = ("loss", "loss_per_token", "grad_norm", "lr", "finite", "bad_steps", "skipped",
                "tokens")


# ----------------------------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS
_FLAGS: dict[str, Any] = {}


def define_flags() -> None:
  """Defines --config, --workdir, --fresh (once; at CLI start, not at import)."""
  if _FLAGS:
    return
  _FLAGS["config"] = config_flags.DEFINE_config_file(
    "config", None, "Config file, FILE.py[:VARIANT] (e.g. configs/uniref50.py:tiny).",
    lock_config=True)
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "Run folder (default runs/<variant>).")
  _FLAGS["fresh"] = flags.DEFINE_bool(
    "fresh", False, "Start over; the workdir's content is moved to <workdir>/old-<timestamp>/ "
    "(nothing is deleted).")


HELP_FLAGS = ("-?", "-help", "--help", "--helpshort", "--helpfull")  # absl's


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; a missing config file, an unknown variant or an unknown `--config.KEY`
  is reported in one line, and a help flag exits 0 (absl's exits 1)."""
  try:
    config_lib.check_override_args(argv[1:])
  except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(EXIT_CONFIG)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    sys.stderr.write(f"error: {lines[-1] if lines else e}\n")  # not a config file's traceback
    sys.exit(EXIT_CONFIG)
  except SystemExit as e:
    if e.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
      sys.exit(EXIT_OK)
    raise


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("absl", "jax._src.xla_bridge"):  # orbax's per-save and jax's backend chatter
    logging.getLogger(name).setLevel(logging.WARNING)
  cfg = _FLAGS["config"].value
  if cfg is None:
    raise app.UsageError("--config=FILE.py[:VARIANT] is required")
  maybe_initialize_distributed()
  import jax  # noqa: PLC0415

  try:
    config_lib.validate(cfg, n_devices=jax.device_count())
  except config_lib.ConfigError as e:
    sys.stderr.write(f"error: {e}\n")
    return EXIT_CONFIG
  workdir = _FLAGS["workdir"].value or os.path.join("runs", str(cfg.variant))
  from sedd_jax.data import fasta as fasta_lib  # noqa: PLC0415
  from sedd_jax.data import store as store_lib  # noqa: PLC0415
  from sedd_jax.training import checkpoint as ckpt_lib  # noqa: PLC0415

  try:
    return train(cfg, workdir, fresh=_FLAGS["fresh"].value).code
  except (fasta_lib.DataError, store_lib.StoreError, ckpt_lib.CheckpointError) as e:
    sys.stderr.write(f"error: {e}\n")  # bad data or checkpoints: one line, no traceback
    return EXIT_CONFIG


def run() -> None:
  """Entry point of `python -m sedd_jax.train`."""
  define_flags()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
