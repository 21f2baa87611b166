"""The periodic actions of the training loop, each owning its cadence; all act on a `run.Run`.

  after_step(run, m)       called once per step, in this order:
    run.ckpt.check           a background save that failed (a full disk) stops the run at once
    read_bad_steps           the consecutive non-finite count, read one step late (no stall)
    log_train                a train row every `log_every` steps, at the end, and when bad
    stop_non_finite          `max_bad_steps` bad steps: checkpoint, event, exit code 3
    evaluate                 validation loss of the EMA weights every `eval_every` steps
    run.write_samples        the task's samples every `sample_every` steps
    save                     a checkpoint every `ckpt_every` / `milestone_every` steps
  The throughput meter restarts after a step that evaluated, sampled or saved.
  write_baseline(run)      at the end (`loop.finish`): the unigram baseline row, once per run
                           folder and store (`unigram_baseline`)
"""

from __future__ import annotations

import logging
import time

import jax
import ml_collections
import numpy as np

from sedd_jax.data import pipeline
from sedd_jax.data import store as store_lib
from sedd_jax.data import tokenizers
from sedd_jax.sampling import likelihood
from sedd_jax.training import metrics as metrics_lib
from sedd_jax.training.run import Run

logger = logging.getLogger("sedd_jax.train")

EXIT_NONFINITE = 3
# Step metrics that are not a task's extra metrics (see `summarize`).
STEP_METRICS = ("loss", "loss_per_token", "grad_norm", "lr", "finite", "bad_steps", "skipped",
                "tokens")
BASELINE_TOKENS = 1 << 24  # the most tokens of each split the unigram baseline reads


def save(run: Run, why: str) -> None:
  """A checkpoint of the current state and data state (once per step)."""
  if run.last_saved == run.step:
    return
  run.ckpt.save(run.state, run.data_after, run.cfg)
  run.last_saved = run.step
  logger.info("checkpoint at step %d (%s)", run.step, why)


def summarize(vals: list[dict]) -> dict[str, float]:
  """One train row from the host values of the steps' metrics: the means over the finite
  steps (over all if none is) of loss, loss_per_token, grad_norm and the task's extra metrics
  (NaN = not measured in that step), and the last step's lr and skipped."""
  finite = [v for v in vals if bool(v["finite"])]
  use = finite or vals
  row = {
    "loss": float(np.mean([v["loss"] for v in use])),
    "loss_per_token": float(np.mean([v["loss_per_token"] for v in use])),
    "grad_norm": float(np.mean([v["grad_norm"] for v in use])),
    "lr": float(vals[-1]["lr"]),
    "skipped": int(vals[-1]["skipped"]),
  }
  for k in vals[-1]:
    if k not in STEP_METRICS:
      xs = np.asarray([v[k] for v in use], np.float64)
      if np.isfinite(xs).any():
        row[k] = float(np.nanmean(xs))
  return row


def log_train(run: Run) -> None:
  """Writes the train row of the pending steps (with throughput, ETA and, where the devices
  report memory, peak_gib)."""
  vals = jax.device_get(run.pending)
  run.pending.clear()
  row = summarize(vals)
  row.update(run.meter.measure(run.step))
  row["eta_s"] = row["step_time"] * (run.total - run.step)
  peak = metrics_lib.peak_memory_gib()
  if peak is not None:
    row["peak_gib"] = peak
  run.writer.train(run.step, row)


def evaluate(run: Run) -> None:
  """Validation losses of the EMA parameters over the fixed validation batches: the eval step's
  sums (`task.eval_loss`) over all batches, per sequence (`valid_<name>`) and, for the loss, per
  real token."""
  totals: dict[str, float] = {}
  for i, b in enumerate(run.eval_batches):
    sums = jax.device_get(run.eval_step(run.state.ema, run.rest, run.built.put_batch(b),
                                        jax.random.fold_in(run.eval_key, i)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  seqs, toks = max(totals.pop("n_seqs"), 1.0), max(totals.pop("n_tokens"), 1.0)
  row = {"valid_loss": totals["loss"] / seqs, "valid_loss_per_token": totals["loss"] / toks}
  row.update({f"valid_{k}": v / seqs for k, v in totals.items() if k != "loss"})
  run.writer.eval(run.step, row)


def read_bad_steps(run: Run, m: dict) -> int:
  """The consecutive non-finite step count. No per-step device-to-host stall: the previous
  step's bad_steps is read once this step is queued; during a bad streak this step's is read at
  once, so the non-finite stop lands on the exact step. With max_bad_steps 1 every step's own
  count is read at once (and nothing else)."""
  if run.cfg.training.max_bad_steps <= 1:
    return int(jax.device_get(m["bad_steps"]))
  bad = int(jax.device_get(run.late["bad_steps"])) if run.late is not None else 0
  if bad:
    bad = int(jax.device_get(m["bad_steps"]))
  run.late = m
  return bad


def stop_non_finite(run: Run, bad: int) -> None:
  """Ends the run with exit code 3 and a checkpoint (holding the last good parameters)."""
  run.code, run.reason = EXIT_NONFINITE, "non-finite"
  save(run, "non-finite")
  logger.error("stopping: %d consecutive steps with a non-finite loss or gradient (up to "
               "step %d; training.max_bad_steps = %d). The checkpoint at step %d holds the "
               "last good parameters. Lower optim.lr, raise optim.warmup or check the data.",
               bad, run.step, run.cfg.training.max_bad_steps, run.step)
  run.writer.event(run.step, "stopped: non-finite", bad_steps=bad)


def _due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


def periodic(run: Run) -> None:
  """Validation, samples and checkpoints when due; the meter restarts after any of them."""
  t, step = run.cfg.training, run.step
  paused = False
  if run.eval_step is not None and _due(step, t.eval_every):
    evaluate(run)
    paused = True
  if run.write_samples is not None and _due(step, t.sample_every):
    run.write_samples(run.state, run.eval_batches, jax.random.fold_in(run.sample_key, step), step)
    paused = True
  if _due(step, t.ckpt_every) or _due(step, t.milestone_every):
    save(run, "periodic")
    paused = True
  if paused:
    run.meter.reset(step)


def after_step(run: Run, m: dict) -> bool:
  """The actions after step `run.step` (metrics `m`); True when the run must stop (a failed
  background save raises, e.g. `checkpointer.DiskFull`)."""
  run.ckpt.check()
  bad = read_bad_steps(run, m)
  if run.step % run.cfg.training.log_every == 0 or run.step == run.total or bad:
    log_train(run)
  if bad >= run.cfg.training.max_bad_steps:
    stop_non_finite(run, bad)
    return True
  periodic(run)
  return False


def _spread(tokens: np.ndarray, cap: int = BASELINE_TOKENS, pieces: int = 64
            ) -> list[np.ndarray]:
  """`tokens (T,)` whole when T <= cap, else `pieces` evenly spaced slices of cap // pieces
  tokens (a sample of the whole split; a memory map reads only those)."""
  if tokens.size <= cap:
    return [tokens]
  n = cap // pieces
  return [tokens[s:s + n] for s in np.linspace(0, tokens.size - n, pieces).astype(np.int64)]


def unigram_baseline(cfg: ml_collections.ConfigDict) -> dict | None:
  """The unigram baseline of the store's proteins: `likelihood.unigram_baseline` fitted on the
  training split (add-one frequencies of the 25 residue letters, as `sedd_jax.evaluate`) over
  the validation split, in nats per residue. Splits of more than BASELINE_TOKENS tokens are
  read as BASELINE_TOKENS tokens in 64 evenly spaced slices.

  Returns:
    {"unigram_per_token", "train_tokens", "valid_tokens", "store"}, or None (with a warning)
    when the store has no such splits.
  """
  root = pipeline.resolve_path(cfg.data.prepared)
  try:
    train, valid = (_spread(store_lib.Store(root, split).track("protein").tokens)
                    for split in ("train", "valid"))
    value = likelihood.unigram_baseline(
        train, valid, vocab=tokenizers.ProteinTokenizer().encode(tokenizers.RESIDUES))
  except (OSError, ValueError, KeyError) as e:
    logger.warning("no unigram baseline for the loss curve (%s)", e)
    return None
  return {"unigram_per_token": value, "train_tokens": sum(t.size for t in train),
          "valid_tokens": sum(t.size for t in valid), "store": str(root)}


def write_baseline(run: Run) -> None:
  """A `baseline` metrics row (`unigram_baseline`, the loss curve's line) unless the run folder
  has one of this store; for the protein-only models (one token track), on process 0."""
  if not run.primary or tuple(run.built.task.token_keys) != ("tokens",):
    return
  store = str(pipeline.resolve_path(run.cfg.data.prepared))
  if any(r.get("kind") == "baseline" and r.get("store") == store
         for r in metrics_lib.read_metrics(run.writer.path)):
    return
  t0 = time.perf_counter()
  row = unigram_baseline(run.cfg)
  if row is not None:
    run.writer.write("baseline", run.step, row)
    logger.info("unigram baseline %.4f nats per residue (%s training, %s validation tokens; "
                "%.2f s)", row["unigram_per_token"], f"{row['train_tokens']:,}",
                f"{row['valid_tokens']:,}", time.perf_counter() - t0)
