"""Validation curve of a training run against wall-clock minutes, next to the unigram baseline.

  python scripts/recipe_curve.py runs/recipe_small [--config configs/uniref50.py:small]

Reads `<workdir>/metrics.jsonl` (eval rows: the EMA weights' validation loss per residue, the
score-entropy negative ELBO estimate at random t) and writes `<workdir>/curve.csv`
(minutes since the first row, step, valid_loss_per_token, unigram) and `<workdir>/curve.png`,
and prints one JSON line per eval row. The unigram baseline is the add-one-smoothed residue
frequencies of the training split scored on the validation split (nats per residue).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("workdir")
  p.add_argument("--config", default="configs/uniref50.py:small",
                 help="config whose data.prepared holds the splits")
  args = p.parse_args(argv)

  import numpy as np
  from matplotlib.figure import Figure

  from sedd_jax import config as config_lib
  from sedd_jax.data import pipeline
  from sedd_jax.data import store as store_lib
  from sedd_jax.sampling import likelihood
  from sedd_jax.training import metrics

  work = pathlib.Path(args.workdir)
  rows = metrics.read_metrics(work / "metrics.jsonl")
  if not rows:
    raise SystemExit(f"{work / 'metrics.jsonl'}: no metrics")
  t0 = min(r["time"] for r in rows)
  evals = [r for r in rows if r.get("kind") == "eval" and "valid_loss_per_token" in r]
  root = pipeline.resolve_path(config_lib.load_config(args.config).data.prepared)
  train, valid = (store_lib.Store(root, split) for split in ("train", "valid"))
  unigram = likelihood.unigram_baseline((np.asarray(train[i]) for i in range(len(train))),
                                        (np.asarray(valid[i]) for i in range(len(valid))),
                                        vocab=range(4, 29))
  lines = ["minutes,step,valid_loss_per_token,unigram"]
  for r in evals:
    minutes = (r["time"] - t0) / 60
    lines.append(f"{minutes:.2f},{r['step']},{r['valid_loss_per_token']:.5f},{unigram:.5f}")
    sys.stdout.write(json.dumps({"minutes": round(minutes, 2), "step": r["step"],
                                 "valid_loss_per_token": r["valid_loss_per_token"],
                                 "unigram": unigram}) + "\n")
  (work / "curve.csv").write_text("\n".join(lines) + "\n")
  fig = Figure(figsize=(6, 4), dpi=110)
  ax = fig.subplots()
  ax.plot([(r["time"] - t0) / 60 for r in evals], [r["valid_loss_per_token"] for r in evals],
          "o-", label="validation (EMA), nats/residue")
  ax.axhline(unigram, color="gray", ls="--", label=f"unigram baseline {unigram:.3f}")
  ax.set_xlabel("minutes")
  ax.set_ylabel("negative ELBO per residue (nats)")
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(work / "curve.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
