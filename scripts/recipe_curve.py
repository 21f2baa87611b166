"""Validation curves of training runs against minutes of training, next to the unigram baseline.

  python scripts/recipe_curve.py runs/recipe_small [--config configs/uniref50.py:small]
  python scripts/recipe_curve.py runs/pack runs/full --labels pack,full --out docs/packing_curve.png \
      --max-minutes 6

Reads each `<workdir>/metrics.jsonl` (eval rows: the EMA weights' validation loss per residue,
the score-entropy negative ELBO estimate at random t). Minutes count training time only: the
time from a run's first row, less the gap from each end event ("stopped by SIGTERM",
"finished", ...) to the first row of the resumed process (the restart and its compilation; the
steps of that first logged window are dropped with it, at most `log_every` steps). Writes a PNG
(one curve per run; default `<workdir>/curve.png` for one run, `--out` for several) and a CSV
beside it (run, minutes, step, valid_loss_per_token, unigram). One JSON line per eval row on
stdout. The unigram baseline is the add-one-smoothed residue frequencies of the training split
scored on the validation split (nats per residue).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def training_minutes(rows: list[dict]) -> list[float]:
  """Minutes of training at each row (rows in file order), without restart gaps."""
  out, elapsed = [], 0.0
  for i, r in enumerate(rows):
    if i:
      prev = rows[i - 1]
      if prev.get("kind") != "event":  # an event ends a process's rows: the next one resumed
        elapsed += r["time"] - prev["time"]
    out.append(elapsed / 60)
  return out


def eval_points(work: pathlib.Path) -> list[tuple[float, int, float]]:
  """(minutes, step, valid_loss_per_token) of each eval row of a run."""
  from sedd_jax.training import metrics

  rows = metrics.read_metrics(work / metrics.METRICS_FILE)
  if not rows:
    raise SystemExit(f"{work / metrics.METRICS_FILE}: no metrics")
  return [(m, r["step"], r["valid_loss_per_token"])
          for m, r in zip(training_minutes(rows), rows)
          if r.get("kind") == "eval" and "valid_loss_per_token" in r]


def unigram_nats(config: str) -> float:
  import numpy as np

  from sedd_jax import config as config_lib
  from sedd_jax.data import pipeline
  from sedd_jax.data import store as store_lib
  from sedd_jax.sampling import likelihood

  root = pipeline.resolve_path(config_lib.load_config(config).data.prepared)
  train, valid = (store_lib.Store(root, split) for split in ("train", "valid"))
  return likelihood.unigram_baseline((np.asarray(train[i]) for i in range(len(train))),
                                     (np.asarray(valid[i]) for i in range(len(valid))),
                                     vocab=range(4, 29))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--labels", default="", help="comma-separated, one per workdir (default: names)")
  p.add_argument("--out", default="", help="PNG path (default <workdir>/curve.png for one run)")
  p.add_argument("--title", default="")
  p.add_argument("--max-minutes", type=float, default=0.0,
                 help="only eval rows within this many minutes of training (0 = all)")
  p.add_argument("--config", default="configs/uniref50.py:small",
                 help="config whose data.prepared holds the splits")
  args = p.parse_args(argv)
  works = [pathlib.Path(w) for w in args.workdirs]
  labels = args.labels.split(",") if args.labels else [w.name for w in works]
  if len(labels) != len(works):
    p.error(f"--labels has {len(labels)} names for {len(works)} workdirs")
  if len(works) > 1 and not args.out:
    p.error("--out is needed with several workdirs")
  out = pathlib.Path(args.out) if args.out else works[0] / "curve.png"

  from matplotlib.figure import Figure

  unigram = unigram_nats(args.config)
  fig = Figure(figsize=(6, 4), dpi=110)
  ax = fig.subplots()
  lines = ["run,minutes,step,valid_loss_per_token,unigram"]
  for work, label in zip(works, labels):
    points = [pt for pt in eval_points(work) if not args.max_minutes or pt[0] <= args.max_minutes]
    for minutes, step, loss in points:
      lines.append(f"{label},{minutes:.2f},{step},{loss:.5f},{unigram:.5f}")
      sys.stdout.write(json.dumps({"run": label, "minutes": round(minutes, 2), "step": step,
                                   "valid_loss_per_token": loss, "unigram": unigram}) + "\n")
    ax.plot([m for m, _, _ in points], [v for _, _, v in points], "o-", ms=3,
            label=f"{label}: validation (EMA)")
  ax.axhline(unigram, color="gray", ls="--", label=f"unigram baseline {unigram:.3f}")
  ax.set_xlabel("minutes of training")
  ax.set_ylabel("negative ELBO per residue (nats)")
  if args.title:
    ax.set_title(args.title, fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out)
  out.with_suffix(".csv").write_text("\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
