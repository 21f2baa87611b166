"""Training metrics: console progress line, JSONL file, wandb, loss-curve PNG.

* Console (`logging`, logger `sedd_jax.train`): one line per `log_every` steps, e.g.
  `step 200/600 | loss 41.27 (2.95/tok) | lr 2.00e-03 | gnorm 3.1 | 12,345 tok/s |
  0.21 s/step | ETA 1m24s | skipped 0` (and `| peak 30.6 GiB` where devices report memory).
* `<workdir>/metrics.jsonl`: one JSON object per line, `{"kind": "train" | "eval" | "sample" |
  "baseline" | "event", "step": int, "time": unix seconds, ...}`; train rows hold loss,
  loss_per_token, lr, grad_norm, tokens_per_s (padded B*L tokens per second),
  real_tokens_per_s, step_time, skipped, and on GPUs peak_gib (the highest peak of device memory
  in use among the process's devices), plus the task's metrics (protein-ligand: `loss/<mode>`,
  the loss of each mode over its own steps); eval rows hold valid_loss and valid_loss_per_token
  (EMA weights; protein-ligand `valid_loss/<mode>`); a baseline row the unigram baseline
  (`hooks.write_baseline`). A resumed run appends (`MetricsWriter(..., start_step=)`), after
  marking `"superseded": true` on the rows of the steps it replays (`supersede_replayed`: every
  row but events after the step it resumed from; all of them when that is 0); a torn last line
  (a crash mid-write) stays as it is, on a line of its own. `read_metrics(path)`: the rows,
  without the superseded ones: one row per step and kind.
* wandb: mode from `cfg.wandb.mode` (offline by default; `disabled` skips it; online is the
  user's choice). WANDB_MODE is set to the same value, so offline never touches the network. The
  run id is kept in `<workdir>/wandb_id` so a resumed run continues the same wandb run. If wandb
  cannot be imported or initialised, a warning is logged and training continues.
* `plot_loss_curve(jsonl, png)`: the PNG of `loss_figure(rows)`: train and validation loss
  against step, per sequence and per residue with the unigram baseline (per residue, of the
  last baseline row) as a dashed line; a run whose rows hold per-mode losses (protein-ligand)
  gets one curve per mode instead, train and validation (matplotlib, no pyplot).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterable

import jax
import ml_collections

if TYPE_CHECKING:
  from matplotlib.figure import Figure

logger = logging.getLogger("sedd_jax.train")

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
SUPERSEDED = "superseded"  # the field marking a row whose step a resumed run writes again


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
               primary: bool = True, start_step: int | None = None):
    """`start_step`: the step this run starts from; the rows of later steps already in the
    file (written by an earlier attempt, replayed now) are marked superseded
    (`supersede_replayed`). None marks nothing."""
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / METRICS_FILE
    self.total_steps = int(cfg.training.steps)
    self.primary = primary
    self._file = None
    if primary:
      if start_step is not None:
        n = supersede_replayed(self.path, start_step)
        if n:
          logger.info("%s: %d rows of the steps after %d (run again from there) marked %r",
                      self.path, n, start_step, SUPERSEDED)
      torn = _ends_torn(self.path)
      self._file = open(self.path, "a", encoding="utf-8")
      if torn:  # a crash mid-write: the next row starts on a line of its own
        self._file.write("\n")
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


def _ends_torn(path: pathlib.Path) -> bool:
  """Whether the file `path` exists and its last line has no newline."""
  if not path.is_file() or path.stat().st_size == 0:
    return False
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b"\n"


def supersede_replayed(path: str | os.PathLike, start_step: int) -> int:
  """Marks `"superseded": true` on the rows of the metrics file `path` that a run starting
  from `start_step` writes again: every row but events of a step after `start_step`, and all
  of them when `start_step` is 0 (a start from step 0 validates step 0 again). Rewrites the
  file atomically (a temporary file, then a rename) when a row changes; other lines (marked
  already, or unparsable) are kept byte for byte. Returns the number of rows marked."""
  p = pathlib.Path(path)
  if not p.is_file():
    return 0
  lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
  marked = 0
  for i, line in enumerate(lines):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if (not isinstance(row, dict) or row.get("kind") == "event" or row.get(SUPERSEDED)
        or (start_step and int(row.get("step", 0)) <= start_step)):
      continue
    row[SUPERSEDED] = True
    lines[i] = json.dumps(row) + "\n"
    marked += 1
  if marked:
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(lines)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  return marked


def read_metrics(path: str | os.PathLike, superseded: bool = False) -> list[dict]:
  """Rows of a metrics JSONL file, without the superseded ones (rows of steps a resumed run
  wrote again) unless `superseded`; unparsable lines (a torn line) are skipped."""
  rows = []
  p = pathlib.Path(path)
  if not p.is_file():
    return rows
  for line in p.read_text(encoding="utf-8").splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if superseded or not (isinstance(row, dict) and row.get(SUPERSEDED)):
      rows.append(row)
  return rows


def _series(rows: Iterable[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) for `kind` rows holding `key`; the last row wins for a repeated step."""
  by_step: dict[int, float] = {}
  for r in rows:
    if r.get("kind") == kind and key in r and r[key] is not None:
      by_step[int(r["step"])] = float(r[key])
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def _baseline(rows: Iterable[dict]) -> float | None:
  """The unigram baseline (nats per residue) of the last baseline row, or None."""
  values = [r["unigram_per_token"] for r in rows
            if r.get("kind") == "baseline" and r.get("unigram_per_token") is not None]
  return float(values[-1]) if values else None


def _modes(rows: list[dict]) -> list[str]:
  """The modes of the per-mode losses (`loss/<mode>` train, `valid_loss/<mode>` eval keys)."""
  found = {k.split("/", 1)[1] for r in rows for k in r
           if (r.get("kind") == "train" and k.startswith("loss/"))
           or (r.get("kind") == "eval" and k.startswith("valid_loss/"))}
  return sorted(found)


def _panels(rows: list[dict]) -> list[tuple[str, list[tuple[str, str, str, dict]], float | None]]:
  """(y label, [(kind, key, label, plot style)], baseline or None) of each panel."""
  train = {"color": "tab:blue", "lw": 1.5}
  valid = {"fmt": "o-", "color": "tab:orange", "lw": 1.5, "ms": 4}
  modes = _modes(rows)
  if not modes:
    return [("loss per sequence (sum over residues)",
             [("train", "loss", "train", train), ("eval", "valid_loss", "valid (EMA)", valid)],
             None),
            ("loss per residue",
             [("train", "loss_per_token", "train", train),
              ("eval", "valid_loss_per_token", "valid (EMA)", valid)], _baseline(rows))]
  colors = {m: f"C{i % 10}" for i, m in enumerate(modes)}
  per_mode_valid = any(k.startswith("valid_loss/") for r in rows if r.get("kind") == "eval"
                       for k in r)
  valid_lines = ([("eval", f"valid_loss/{m}", m, {**valid, "color": colors[m]}) for m in modes]
                 if per_mode_valid else  # one mode trained: its loss is `valid_loss`
                 [("eval", "valid_loss", modes[0] if len(modes) == 1 else "valid (EMA)", valid)])
  return [("train loss per sequence, by mode",
           [("train", f"loss/{m}", m, {"color": colors[m], "lw": 1.2}) for m in modes], None),
          ("validation loss per sequence (EMA), by mode", valid_lines, None)]


def loss_figure(rows: list[dict], title: str = "") -> "Figure | None":
  """The loss curves of metrics rows (`read_metrics`) as a matplotlib Figure (see the module
  docstring for the panels), or None when the rows hold no loss."""
  panels = _panels(rows)
  series = [[(_series(rows, kind, key), label, style) for kind, key, label, style in lines]
            for _, lines, _ in panels]
  if not any(steps for lines in series for (steps, _), _, _ in lines):
    return None
  from matplotlib.figure import Figure  # noqa: PLC0415  (no pyplot: the caller's backend stays)

  fig = Figure(figsize=(11, 4.2), dpi=110)
  axes = fig.subplots(1, len(panels))
  for ax, (ylabel, _, baseline), lines in zip(axes, panels, series):
    for (steps, values), label, style in lines:
      if steps:
        style = dict(style)
        ax.plot(steps, values, style.pop("fmt", "-"), label=label, **style)
    if baseline is not None:
      ax.axhline(baseline, ls="--", color="tab:gray", lw=1.2,
                 label=f"unigram baseline (valid) {baseline:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.lines:
      ax.legend(fontsize="small")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_loss_curve(metrics_path: str | os.PathLike, out_path: str | os.PathLike,
                    title: str = "") -> pathlib.Path | None:
  """Writes `loss_figure` of the rows of `metrics_path` as a PNG; None if they hold no loss."""
  fig = loss_figure(read_metrics(metrics_path), title)
  if fig is None:
    return None
  out = pathlib.Path(out_path)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out)
  return out
