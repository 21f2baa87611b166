"""Training curves of speed options against the PyTorch reference's (issue 17's curve rule).

A change that alters numerics (a dropout RNG, a bf16 residual stream, a fused kernel, FP8) may
become a default only if its training curve stays on the reference's: within the spread of
reference seeds (`../shared/bench/README.md`, "Training curves"). This script runs, as fresh
processes spread over the GPUs (one job per GPU at a time):

* the reference, `.bench/torch_reference_curve.py STORE L B STEPS`, once per `--ref-seeds` seed
  (the script seeds torch and numpy with 0; seed s shifts both by s: see `_REF_WRAPPER`);
* sedd_jax (`python -m sedd_jax.train`, `configs/uniref50.py:small`) once per `--variants`
  entry: '+'-joined model tokens of benchmarks/step_options.py (`TOKENS`: hash, normpallas,
  bf16res, ...), `default` = the config as it is;

all `small` at L = 256, B = 128, lr 3e-4, warmup 300, on the bundled UniProt sequences of at
least L residues (random L-windows, no padding), mean loss per residue per 100 steps. It prints
one JSON line per run (`curve`: step -> loss per residue; `mean_tail`: the mean over the last
third of the steps), then a table of each variant's tail mean against the reference seeds'
(within 2 standard errors of the seeds' own spread: `compare`) and against the `default` run,
and writes a PNG of the curves. `--from-logs` redraws table and PNG from such JSON lines.

  python benchmarks/curve_check.py                                   # GPU: 2 ref seeds + 3 variants
  python benchmarks/curve_check.py --variants default,hash --ref-seeds 0,1 --gpus 0,1
  python benchmarks/curve_check.py --variants default,gateblocked --ref-seeds '' --gpus 0,0
  python benchmarks/curve_check.py --from-logs run1.log run2.log --png docs/curves.png  # redraw
  python benchmarks/curve_check.py --config configs/uniref50.py:tiny --length 64 --batch 4 \
    --steps 200 --ref-seeds '' --variants default,hash --gpus cpu --store /tmp/u64   # CPU dry run

The store (`data/prepared/u256`, sequences >= 256) is prepared first, once, before any job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
log = logging.getLogger("curve_check")

# The reference with its two seeds shifted by SEED (the script hard-codes 0 for both).
_REF_WRAPPER = """
import os, sys, runpy
import numpy as np, torch
seed = int(os.environ["SEED"])
_manual_seed, _default_rng = torch.manual_seed, np.random.default_rng
torch.manual_seed = lambda s: _manual_seed(s + seed)
np.random.default_rng = lambda s=None: _default_rng(None if s is None else s + seed)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def variant_overrides(variant: str) -> dict[str, str]:
  """'+'-joined model tokens of benchmarks/step_options.py (`TOKENS`), or `default`, -> config
  overrides `model.<key>`."""
  if variant == "default":
    return {}
  from step_options import TOKENS  # beside this script; the same names in both benchmarks
  out: dict[str, str] = {}
  for tok in variant.split("+"):
    if tok not in TOKENS:
      raise SystemExit(f"variant {variant!r}: unknown token {tok!r}; choose from {sorted(TOKENS)}")
    out.update({f"model.{k}": str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in TOKENS[tok].items()})
  return out


def base_overrides(args) -> dict[str, str]:
  """The README's sedd_jax side of the reference comparison."""
  return {"model.length": str(args.length), "training.batch_size": str(args.batch),
          "data.min_length": str(args.length), "data.prepared": args.store,
          "data.pad_to": "full", "optim.warmup": "300", "optim.lr": "3e-4",
          "training.steps": str(args.steps), "training.log_every": "100",
          "training.eval_every": "0", "training.sample_every": "0",
          "training.ckpt_every": str(args.steps), "training.milestone_every": "0",
          "wandb.mode": "disabled"}


def prepare(args) -> None:
  """Prepares the store of sequences >= L once (jobs would race to write it)."""
  sys.path.insert(0, str(ROOT))
  from sedd_jax import config as config_lib
  from sedd_jax.data import pipeline
  cfg = config_lib.load_config(args.config)
  cfg.data.min_length = args.length
  cfg.data.prepared = args.store
  pipeline.ensure_prepared(cfg)


def jobs(args) -> list[tuple[str, list[str], dict[str, str]]]:
  """(name, command, extra environment) of every run."""
  out = []
  for seed in [int(s) for s in args.ref_seeds.split(",") if s]:
    cmd = [sys.executable, "-c", _REF_WRAPPER, args.reference, args.store, str(args.length),
           str(args.batch), str(args.steps)]
    out.append((f"ref_seed{seed}", cmd, {"SEED": str(seed)}))
  for variant in [v for v in args.variants.split(",") if v]:
    over = {**base_overrides(args), **variant_overrides(variant)}
    cmd = [sys.executable, "-m", "sedd_jax.train", f"--config={args.config}",
           "--workdir", str(pathlib.Path(args.root) / variant), "--fresh"]
    cmd += [f"--config.{k}={v}" for k, v in over.items()]
    out.append((variant, cmd, {}))
  return out


def read_curve(name: str, logfile: pathlib.Path, workdir: pathlib.Path) -> dict[int, float]:
  """step -> mean loss per residue of the 100 steps before it."""
  if name.startswith("ref_"):
    rows = [json.loads(l) for l in logfile.read_text().splitlines() if l.startswith("{")]
    return {r["step"]: r["loss_per_token"] for r in rows if r.get("impl") == "torch-ref"}
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss_per_token"] for r in rows if r["kind"] == "train"}


def run_all(args) -> dict[str, dict[int, float]]:
  """Runs the jobs, one per GPU at a time; returns each finished run's curve."""
  root = pathlib.Path(args.root)
  root.mkdir(parents=True, exist_ok=True)
  todo, running, curves = jobs(args), {}, {}
  slots = args.gpus.split(",")  # a GPU named twice runs two jobs at once
  while todo or running:
    for slot in [i for i in range(len(slots)) if i not in running]:
      if not todo:
        break
      name, cmd, env = todo.pop(0)
      logfile = root / f"{name}.log"
      full_env = {**os.environ, **env, "CUDA_VISIBLE_DEVICES": slots[slot]}
      if slots.count(slots[slot]) > 1:  # shared: no process may take most of its memory
        full_env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
      proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=logfile.open("w"),
                              stderr=subprocess.STDOUT)
      running[slot] = (name, proc, logfile, time.perf_counter())
      log.info("GPU %s: %s", slots[slot], name)
    time.sleep(2)
    for slot, (name, proc, logfile, t0) in list(running.items()):
      if proc.poll() is None and time.perf_counter() - t0 < args.timeout:
        continue
      if proc.poll() is None:
        proc.kill()
      del running[slot]
      wall = time.perf_counter() - t0
      curve = read_curve(name, logfile, root / name) if proc.returncode == 0 else {}
      if not curve:
        tail = logfile.read_text()[-1500:]
        print(json.dumps({"run": name, "failed": f"rc {proc.returncode}", "wall_s": round(wall, 1),
                          "log_tail": tail}), flush=True)
        continue
      curves[name] = curve
      print(json.dumps({"run": name, "wall_s": round(wall, 1), "mean_tail": mean_tail(curve),
                        "curve": curve}), flush=True)
  return curves


def mean_tail(curve: dict[int, float]) -> float:
  """Mean loss per residue over the last third of the logged steps."""
  return round(float(np.mean([curve[s] for s in tail_steps(curve)])), 4)


def tail_steps(curve: dict[int, float]) -> list[int]:
  """The logged steps of the last third (those `mean_tail` averages)."""
  steps = sorted(curve)
  return [s for s in steps if s > steps[-1] * 2 // 3]


def compare(curves: dict[str, dict[int, float]], sigmas: float = 2.0) -> dict[str, dict]:
  """Each run's tail mean against the reference seeds' (`ref_*` runs, at least two) and, where a
  `default` run exists, against it.

  The reference's own noise: at each tail step the seeds' sample variance, pooled over the tail
  -> sd, the spread of one 100-step mean between seeds. A run's tail mean (n steps) minus the
  mean of the k seeds' tail means then has the standard error sd * sqrt(1/n + 1/(k n)), and the
  run is `on` the reference's curve when that difference is within `sigmas` standard errors. The
  two seeds' tail means alone are no spread to test against: two numbers can land arbitrarily
  close (0.0001 apart on the H200), closer than sedd_jax's default run, whose parity with the
  reference is pinned by the tests, lands from them.
  `vs_default`: the run's tail mean minus the default run's, a paired difference (the same
  batches and noise levels; only the option's arithmetic or dropout bits differ).
  Returns name -> {mean_tail, vs_reference, tolerance, on_reference (None without two seeds),
  vs_default (None without a default run)}.
  """
  refs = {k: c for k, c in curves.items() if k.startswith("ref_")}
  tol = ref_mean = float("nan")
  if len(refs) >= 2:
    steps = tail_steps(next(iter(refs.values())))
    seeds = np.array([[c[s] for s in steps] for c in refs.values()])  # (k, n)
    sd = float(np.sqrt(np.mean(np.var(seeds, axis=0, ddof=1))))
    k, n = seeds.shape
    tol = sigmas * sd * float(np.sqrt(1 / n + 1 / (k * n)))
    ref_mean = float(seeds.mean())
  out = {}
  for name, curve in curves.items():
    m = mean_tail(curve)
    diff = m - ref_mean
    out[name] = dict(
        mean_tail=round(m, 4), vs_reference=round(diff, 4), tolerance=round(tol, 4),
        on_reference=None if np.isnan(tol) or name in refs else bool(abs(diff) <= tol),
        vs_default=(round(m - mean_tail(curves["default"]), 4)
                    if "default" in curves and name != "default" and not name.startswith("ref_")
                    else None))
  return out


def report(curves: dict[str, dict[int, float]], png: pathlib.Path) -> None:
  """The table against the reference seeds (`compare`), and the PNG."""
  rows = compare(curves)
  tol = next(iter(rows.values()))["tolerance"] if rows else float("nan")
  print(f"| run | mean loss/residue, last third | minus the reference seeds' | on the reference's "
        f"curve (within +-{tol}, 2 standard errors of its seeds) | minus `default` (paired) |")
  print("|---|---|---|---|---|")
  for name, r in rows.items():
    on = {None: "(reference)" if name.startswith("ref_") else "no reference seeds",
          True: "yes", False: "NO"}[r["on_reference"]]
    paired = "" if r["vs_default"] is None else f"{r['vs_default']:+.4f}"
    print(f"| {name} | {r['mean_tail']} | {r['vs_reference']:+.4f} | {on} | {paired} |")
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 4.2), dpi=110)
  ax = fig.subplots()
  for name, curve in curves.items():
    steps = sorted(curve)
    ax.plot(steps, [curve[s] for s in steps], label=name,
            ls="--" if name.startswith("ref_") else "-", lw=1.2)
  later = [v for c in curves.values() for s, v in c.items() if s > min(c)]  # all but the first
  if later:  # the first logged mean (warm-up) would squash the rest into a line
    pad = 0.1 * (max(later) - min(later)) + 1e-4
    ax.set_ylim(min(later) - pad, max(later) + pad)
  ax.set_xlabel("step")
  ax.set_ylabel("loss per residue (mean of 100 steps)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(png)
  print(f"plot: {png}")


def main() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variants", default="default,hash,hash+bf16res",
                 help="comma-separated; '+'-joined tokens of step_options.TOKENS, or default")
  p.add_argument("--ref-seeds", default="0,1", help="reference seeds ('' = no reference)")
  p.add_argument("--reference", default=".bench/torch_reference_curve.py")
  p.add_argument("--gpus", default="0,1", help="CUDA_VISIBLE_DEVICES of the job slots; a GPU "
                 "named n times runs n jobs at once (without memory preallocation)")
  p.add_argument("--config", default="configs/uniref50.py:small",
                 help="sedd_jax side (the reference is always SEDD-small)")
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--store", default="data/prepared/u256")
  p.add_argument("--root", default="runs/curve_check")
  p.add_argument("--timeout", type=float, default=600, help="seconds per run")
  p.add_argument("--png", default="runs/curve_check/curves.png")
  p.add_argument("--from-logs", nargs="+", metavar="LOG",
                 help="no runs: the table and PNG of the JSON lines of earlier runs' output")
  args = p.parse_args()
  if args.from_logs:
    curves = {}
    for log_file in args.from_logs:
      for line in pathlib.Path(log_file).read_text().splitlines():
        if line.startswith('{"run"'):
          row = json.loads(line)
          curves[row["run"]] = {int(k): v for k, v in row["curve"].items()}
    report(curves, pathlib.Path(args.png))
    return
  for v in args.variants.split(","):
    variant_overrides(v)  # unknown tokens fail before any job starts
  prepare(args)
  curves = run_all(args)
  report(curves, pathlib.Path(args.png))


if __name__ == "__main__":
  main()
