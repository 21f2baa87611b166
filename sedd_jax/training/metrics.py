"""Training metrics: console progress line, JSONL file, wandb, loss-curve PNG.

* Console (`logging`, logger `sedd_jax.train`): one line per `log_every` steps, e.g.
  `step 200/600 | loss 41.27 (2.95/tok) | lr 2.00e-03 | gnorm 3.1 | 12,345 tok/s |
  0.21 s/step | ETA 1m24s | skipped 0` (and `| peak 30.6 GiB` where devices report memory).
* `<workdir>/metrics.jsonl`: one JSON object per line, `{"kind": "train" | "eval" | "event",
  "step": int, "time": unix seconds, ...}`; train rows hold loss, loss_per_token, lr, grad_norm,
  tokens_per_s (padded B*L tokens per second), real_tokens_per_s, step_time, skipped, and on
  GPUs peak_gib (the highest peak of device memory in use among the process's devices); eval rows
  hold valid_loss and valid_loss_per_token (EMA weights). A resumed run appends.
* wandb: mode from `cfg.wandb.mode` (offline by default; `disabled` skips it; online is the
  user's choice). WANDB_MODE is set to the same value, so offline never touches the network. The
  run id is kept in `<workdir>/wandb_id` so a resumed run continues the same wandb run. If wandb
  cannot be imported or initialised, a warning is logged and training continues.
* `plot_loss_curve(jsonl, png)`: train and validation loss against step, per sequence and per
  residue (matplotlib Agg).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import time
import uuid
from typing import Any, Iterable

import jax
import ml_collections

logger = logging.getLogger("sedd_jax.train")

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def format_duration(seconds: float) -> str:
  """'1h02m', '3m05s', '12s' (or '?' when unknown)."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  s = int(round(seconds))
  if s >= 3600:
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
  if s >= 60:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s}s"


def progress_line(step: int, total: int, m: dict[str, float]) -> str:
  """The console line for a train row (keys as in the JSONL train rows)."""
  parts = [f"step {step}/{total}",
           f"loss {m['loss']:.4g} ({m.get('loss_per_token', float('nan')):.3f}/tok)",
           f"lr {m['lr']:.2e}",
           f"gnorm {m['grad_norm']:.3g}",
           f"{m.get('tokens_per_s', 0.0):,.0f} tok/s",
           f"{m.get('step_time', 0.0):.3f} s/step",
           f"ETA {format_duration(m.get('eta_s', float('nan')))}",
           f"skipped {int(m.get('skipped', 0))}"]
  if "peak_gib" in m:
    parts.append(f"peak {m['peak_gib']:.1f} GiB")
  return " | ".join(parts)


def peak_memory_gib(devices=None) -> float | None:
  """The highest `peak_bytes_in_use` among `devices` (default: this process's) in GiB, or None
  where the backend reports no memory statistics (CPUs)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use")
           for d in (jax.local_devices() if devices is None else devices)]
  peaks = [p for p in peaks if p]
  return max(peaks) / 2**30 if peaks else None


class Throughput:
  """Wall time per step and tokens per second over the window since the last `measure`."""

  def __init__(self, start_step: int):
    self._t = time.perf_counter()
    self._step = start_step
    self._tokens = 0.0
    self._real = 0.0
    self.step_times: list[float] = []

  def add_tokens(self, padded: float, real: float) -> None:
    self._tokens += padded
    self._real += real

  def reset(self, step: int) -> None:
    """Starts a new window at `step` (e.g. after evaluation or checkpointing pauses)."""
    self._t = time.perf_counter()
    self._step = step
    self._tokens = 0.0
    self._real = 0.0

  def measure(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    dt = max(now - self._t, 1e-9)
    n = max(step - self._step, 1)
    out = {"step_time": dt / n, "tokens_per_s": self._tokens / dt,
           "real_tokens_per_s": self._real / dt}
    self.step_times.append(dt / n)
    self.reset(step)
    return out


class MetricsWriter:
  """Writes metric rows to the console, `<workdir>/metrics.jsonl` and wandb (primary host)."""

  def __init__(self, workdir: str | os.PathLike, cfg: ml_collections.ConfigDict,
               primary: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / METRICS_FILE
    self.total_steps = int(cfg.training.steps)
    self.primary = primary
    self._file = open(self.path, "a", encoding="utf-8") if primary else None
    self._wandb = init_wandb(cfg, self.workdir) if primary else None

  def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
    """Appends one row (floats rounded to 7 significant digits) and sends it to wandb."""
    if not self.primary:
      return
    row = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
    for k, v in values.items():
      row[k] = float(f"{float(v):.7g}") if isinstance(v, (int, float)) or hasattr(v, "item") \
        else v
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._wandb is not None:
      try:
        prefix = "train" if kind == "train" else kind
        self._wandb.log({f"{prefix}/{k}": v for k, v in row.items()
                         if k not in ("kind", "step", "time") and isinstance(v, (int, float))},
                        step=int(step))
      except Exception as e:  # noqa: BLE001 -- logging must never stop training
        logger.warning("wandb.log failed (%s); disabling wandb for this run", e)
        self._wandb = None

  def train(self, step: int, values: dict[str, float]) -> None:
    """A train row plus the console progress line."""
    self.write("train", step, values)
    if self.primary:
      logger.info(progress_line(step, self.total_steps, values))

  def eval(self, step: int, values: dict[str, float]) -> None:
    self.write("eval", step, values)
    if self.primary:
      logger.info("step %d/%d | valid loss %.4g (%.3f/tok) [EMA]", step, self.total_steps,
                  values["valid_loss"], values.get("valid_loss_per_token", float("nan")))

  def event(self, step: int, message: str, **values: Any) -> None:
    self.write("event", step, {"message": message, **values})

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._wandb is not None:
      try:
        self._wandb.finish()
      except Exception as e:  # noqa: BLE001
        logger.warning("wandb.finish failed: %s", e)
      self._wandb = None


def init_wandb(cfg: ml_collections.ConfigDict, workdir: pathlib.Path):
  """A wandb run per `cfg.wandb` (see the module docstring), or None."""
  mode = str(cfg.wandb.mode)
  if mode == "disabled":
    return None
  os.environ["WANDB_MODE"] = mode
  os.environ.setdefault("WANDB_SILENT", "true")
  try:
    import wandb  # noqa: PLC0415 -- optional
  except Exception as e:  # noqa: BLE001
    logger.warning("wandb cannot be imported (%s); continuing without it", e)
    return None
  id_file = workdir / "wandb_id"
  try:
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    run = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name or None, id=run_id,
                     resume="allow", dir=str(workdir), mode=mode, config=cfg.to_dict(),
                     settings=wandb.Settings(silent=True, console="off"))
    logger.info("wandb run %s (%s) in %s", run_id, mode, workdir / "wandb")
    return run
  except Exception as e:  # noqa: BLE001
    logger.warning("wandb.init failed (%s); continuing without wandb", e)
    return None


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """Rows of a metrics JSONL file (unparsable lines, e.g. a torn last line, are skipped)."""
  rows = []
  p = pathlib.Path(path)
  if not p.is_file():
    return rows
  for line in p.read_text(encoding="utf-8").splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def _series(rows: Iterable[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) for `kind` rows holding `key`; the last row wins for a repeated step."""
  by_step: dict[int, float] = {}
  for r in rows:
    if r.get("kind") == kind and key in r and r[key] is not None:
      by_step[int(r["step"])] = float(r[key])
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def plot_loss_curve(metrics_path: str | os.PathLike, out_path: str | os.PathLike,
                    title: str = "") -> pathlib.Path | None:
  """Writes a PNG of train loss and EMA validation loss against step; None if no data."""
  rows = read_metrics(metrics_path)
  if not _series(rows, "train", "loss")[0] and not _series(rows, "eval", "valid_loss")[0]:
    return None
  from matplotlib.figure import Figure  # noqa: PLC0415  (no pyplot: the caller's backend stays)

  panels = (("loss", "valid_loss", "loss per sequence (sum over residues)"),
            ("loss_per_token", "valid_loss_per_token", "loss per residue"))
  fig = Figure(figsize=(11, 4.2), dpi=110)
  axes = fig.subplots(1, 2)
  for ax, (train_key, valid_key, label) in zip(axes, panels):
    steps, values = _series(rows, "train", train_key)
    vsteps, vvalues = _series(rows, "eval", valid_key)
    if steps:
      ax.plot(steps, values, label="train", color="tab:blue", lw=1.5)
    if vsteps:
      ax.plot(vsteps, vvalues, "o-", label="valid (EMA)", color="tab:orange", lw=1.5, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  out = pathlib.Path(out_path)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out)
  return out
