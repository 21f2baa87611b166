"""Held-out likelihood against EvoDiff's OA-DM 38M at equal GPU wall time (issue 34).

  python benchmarks/peer_likelihood.py --out runs/peer34                      # GPU: everything
  python benchmarks/peer_likelihood.py --out runs/peer34 --stages export,oadm # the peer only
  python benchmarks/peer_likelihood.py --out runs/peer34 --stages export,sedd \
      --eval-fasta eval_cropped.fasta --match-residues 64000000              # sedd_jax only
  python benchmarks/peer_likelihood.py --out runs/peer34 --stages summary     # the table (CPU)
  python benchmarks/peer_likelihood.py --out /tmp/p --seconds 20 --config configs/uniref50.py:tiny \
      --set model.length=1024 --set training.batch_size=2 --oadm-config tiny --num-samples 2 \
      --oadm-launcher "python3 .bench/evodiff_oadm/train_oadm.py"             # CPU dry run

(`.bench` is a copy of ../shared/bench, as ../shared/bench/README.md says; the CPU dry run needs
the EvoDiff wheels and scipy, pandas and scikit-learn on PYTHONPATH, about 5 minutes on 2 cores.)

Stages, in this order (`--stages` picks some; the default runs all four):

* export: prepares the store of `--config` (its data.prepared; `--set` applies) and writes its
  train and valid splits as FASTA (OUT/train.fasta, OUT/valid.fasta), one record per stored
  sequence: what both models train on and are scored on.
* oadm: `.bench/evodiff_oadm/run_on_gpu.sh OUT/train.fasta OUT/valid.fasta --seconds S --out
  OUT/oadm --config 38M --warmup-steps 1000 --eval-n N --eval-draws D --clock-from-process-start`
  (`../shared/bench/evodiff_oadm/README.md`; the clock counts from process start, as sedd_jax's
  does). It writes OUT/oadm/eval_cropped.fasta, the exact sequences it scored.
* sedd: `timeout S python -m sedd_jax.train --config=CONFIG --workdir OUT/sedd --fresh` with
  `--set` overrides over this script's short-run schedule (`SEDD_DEFAULTS`): S seconds from
  process start, imports, data and compilation included. timeout's SIGTERM makes the trainer
  finish its step, write a checkpoint and exit 0 (sedd_jax/training/runtime.py `StopFlag`).
  Checkpoints every `--ckpt-every` steps (default: the step at which sedd_jax has trained as
  many residues as `--match-residues`, else OA-DM's result.json, else 1000). Then `python -m
  sedd_jax.evaluate --fasta EVAL --num-samples K` (EVAL: `--eval-fasta`, default
  OUT/oadm/eval_cropped.fasta) on the final EMA weights, the final raw parameters
  (`--use-params`) and the EMA checkpoint nearest OA-DM's residue count (`--evals` picks; they
  share one JAX compilation cache, OUT/jax_cache).
* summary: OUT/summary.json and a printed table: per model and checkpoint the steps, residues
  trained, wall seconds, the bound per residue (nats) with its Monte-Carlo SE and its SE over
  sequences (ratio estimator, as train_oadm.py's `eval_se`), the unigram baselines, and the
  paired difference sedd_jax - OA-DM per residue on the same sequences with its SE.

Residues trained by sedd_jax: per logged window, the padded B x L tokens of its steps times
the window's real_tokens_per_s / tokens_per_s (`residues_at_steps`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import pathlib
import shlex
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
log = logging.getLogger("peer_likelihood")

STAGES = ("export", "oadm", "sedd", "summary")
# The short-run schedule of docs/recipe_small.md (EMA 0.999, warm-up 1000) at the length and
# batch of `small` (L 1024 x 64 rows: the same 65,536 tokens a step as the recipe's 512 x 128,
# and no sequence of the valid split (<= data.max_length = 1000) is cropped by evaluate, so
# both models score exactly the same residues). No in-training validation or samples (OA-DM has
# none either); --set overrides any of these.
SEDD_DEFAULTS = {"model.length": "1024", "training.batch_size": "64", "training.ema": "0.999",
                 "optim.warmup": "1000", "optim.lr": "3e-4", "training.steps": "1000000",
                 "training.eval_every": "0", "training.sample_every": "0",
                 "training.milestone_every": "0", "training.keep": "6",
                 "training.compile_cache": "", "wandb.mode": "disabled"}
REAL_FRACTION_GUESS = 0.985  # packed rows of the bundled set: ~1.5% padding (docs/recipe_small.md)


def ratio_se(values: np.ndarray, lengths: np.ndarray) -> tuple[float, float]:
  """(R, SE): R = sum(values) / sum(lengths), the per-residue figure of per-sequence totals
  `values` (N,) over sequences of `lengths` (N,), and the ratio estimator's standard error over
  the sequences, sqrt(N / (N - 1) * sum((v_i - R D_i)^2)) / sum(D) (train_oadm.py's `eval_se`)."""
  v = np.asarray(values, np.float64)
  d = np.asarray(lengths, np.float64)
  if v.ndim != 1 or v.shape != d.shape or v.size == 0:
    raise ValueError(f"values and lengths must be equal-length 1-D arrays; got shapes {v.shape} "
                     f"and {d.shape}")
  r = v.sum() / d.sum()
  n = v.size
  se = math.sqrt(n / max(n - 1, 1) * float(((v - r * d) ** 2).sum())) / d.sum()
  return float(r), se


def residues_at_steps(rows: list[dict], tokens_per_step: int) -> dict[int, float]:
  """Cumulative residues trained at each logged step, from the trainer's train rows (each
  covers the steps since the previous row): tokens_per_step padded tokens a step times the
  row's real_tokens_per_s / tokens_per_s."""
  out, prev, total = {}, 0, 0.0
  for r in sorted((r for r in rows if r.get("kind") == "train"), key=lambda r: r["step"]):
    if r["step"] <= prev:
      continue
    real = r["real_tokens_per_s"] / r["tokens_per_s"] if r.get("tokens_per_s") else 1.0
    total += (r["step"] - prev) * tokens_per_step * real
    out[int(r["step"])] = total
    prev = r["step"]
  return out


def sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def sh(cmd: list[str], logfile: pathlib.Path, timeout: float | None = None) -> int:
  """Runs `cmd` from the repository root, output to `logfile`; returns its exit code."""
  log.info("$ %s  (log: %s)", shlex.join(cmd), logfile)
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  with logfile.open("w") as f:
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                          timeout=timeout, check=False).returncode


def load_cfg(args):
  sys.path.insert(0, str(ROOT))
  from sedd_jax import config as config_lib
  return config_lib.load_config(args.config, sedd_overrides(args))


def sedd_overrides(args) -> dict[str, str]:
  over = dict(SEDD_DEFAULTS)
  over.update(kv.split("=", 1) for kv in args.set)
  return over


def export(args, out: pathlib.Path) -> dict:
  """The store's train and valid splits as FASTA; returns counts and hashes."""
  from sedd_jax.data import pipeline
  from sedd_jax.data import store as store_lib
  from sedd_jax.data import tokenizers

  t0 = time.perf_counter()
  root = pipeline.ensure_prepared(load_cfg(args))
  tok = tokenizers.ProteinTokenizer()
  info = {"store": str(root)}
  for split in ("train", "valid"):
    st = store_lib.Store(root, split)
    path = out / f"{split}.fasta"
    n_res = 0
    with path.open("w") as f:
      for i in range(len(st)):
        seq = tok.decode(st[i])
        n_res += len(seq)
        f.write(f">{split}{i}\n{seq}\n")
    info[split] = {"path": str(path), "sequences": len(st), "residues": n_res,
                   "sha256": sha256(path)}
  info["seconds"] = time.perf_counter() - t0
  log.info("export: %s", json.dumps(info))
  return info


def run_oadm(args, out: pathlib.Path) -> int:
  cmd = shlex.split(args.oadm_launcher) + [
      str(out / "train.fasta"), str(out / "valid.fasta"), "--seconds", str(args.seconds),
      "--out", str(out / "oadm"), "--config", args.oadm_config, "--eval-n", str(args.eval_n),
      "--eval-draws", str(args.eval_draws), "--clock-from-process-start"]
  if args.oadm_config == "38M":
    cmd += ["--warmup-steps", str(args.oadm_warmup)]
  cmd += shlex.split(args.oadm_extra)
  rc = sh(cmd, out / "oadm.log")
  log.info("oadm: exit %d; %s", rc, (out / "oadm" / "result.json").exists())
  return rc


def oadm_residues(args, out: pathlib.Path) -> float | None:
  if args.match_residues:
    return float(args.match_residues)
  res = out / "oadm" / "result.json"
  return float(json.loads(res.read_text())["train_residues"]) if res.exists() else None


def run_sedd(args, out: pathlib.Path) -> int:
  over = sedd_overrides(args)
  tokens_per_step = int(over["model.length"]) * int(over["training.batch_size"])
  target = oadm_residues(args, out)
  log_every = int(over.get("training.log_every", 50))
  every = args.ckpt_every
  if every is None:
    every = 1000 if target is None else target / (tokens_per_step * REAL_FRACTION_GUESS)
    every = max(log_every, int(round(every / log_every)) * log_every)  # on a logged step
  over["training.ckpt_every"] = str(every)
  workdir = out / "sedd"
  cmd = ["timeout", "--kill-after=120", str(args.seconds), sys.executable, "-m",
         "sedd_jax.train", f"--config={args.config}", "--workdir", str(workdir), "--fresh"]
  cmd += [f"--config.{k}={v}" for k, v in over.items()]
  t0 = time.time()
  rc = sh(cmd, out / "sedd_train.log")
  wall = time.time() - t0
  (out / "sedd_run.json").write_text(json.dumps(
      {"exit": rc, "wall_s": wall, "seconds": args.seconds, "overrides": over,
       "tokens_per_step": tokens_per_step, "command": shlex.join(cmd)}, indent=1))
  log.info("sedd train: exit %d after %.1f s (124 = stopped by the time limit)", rc, wall)
  if rc not in (0, 124):
    return rc
  eval_fasta = pathlib.Path(args.eval_fasta or out / "oadm" / "eval_cropped.fasta")
  ckpts = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  res = residues_at_steps(read_jsonl(workdir / "metrics.jsonl"), tokens_per_step)
  evals = args.evals.split(",")
  jobs = [(name, src) for name, src in (
      ("ema_final", ["--workdir", str(workdir)]),
      ("params_final", ["--workdir", str(workdir), "--use-params"])) if name in evals]
  if target is not None and res and "matched" in evals:
    logged = [s for s in ckpts if s in res and s != ckpts[-1]]
    if logged:
      near = min(logged, key=lambda s: abs(res[s] - target))
      jobs.append((f"ema_step{near}", ["--checkpoint", str(workdir / "checkpoints" / str(near))]))
  env_cache = str(out / "jax_cache")  # the evaluations share one compiled function
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", env_cache)
  for name, src in jobs:
    cmd = [sys.executable, "-m", "sedd_jax.evaluate", *src, "--fasta", str(eval_fasta),
           "--num-samples", str(args.num_samples), "--batch-size", str(args.eval_batch),
           "--no-pseudo-perplexity", "--out", str(out / f"sedd_eval_{name}.json")]
    t1 = time.time()
    erc = sh(cmd, out / f"sedd_eval_{name}.log")
    log.info("evaluate %s: exit %d in %.1f s", name, erc, time.time() - t1)
  return 0


def summary(args, out: pathlib.Path) -> dict:
  """OUT/summary.json from whatever the stages left in OUT."""
  rows, s = [], {"out": str(out), "date": time.strftime("%Y-%m-%d")}
  oadm_dir = out / "oadm"
  oadm_seq = None
  if (oadm_dir / "result.json").exists():
    r = json.loads((oadm_dir / "result.json").read_text())
    tsv = np.genfromtxt(oadm_dir / "eval_per_seq.tsv", names=True, delimiter="\t")
    oadm_seq = (np.atleast_1d(tsv["bound_nats"]), np.atleast_1d(tsv["length"]))
    rr, se_seq = ratio_se(*oadm_seq)
    rows.append({"model": f"OA-DM {r['config']['name']}", "checkpoint": "final",
                 "steps": r["train_steps"], "residues": r["train_residues"],
                 "wall_s": r["train_wall_s"], "nll": r["eval_nll_per_residue"],
                 "nll_recomputed": rr, "se_mc": r["eval_se_mc"], "se_seq": r["eval_se"],
                 "sequences": r["eval_n_seqs"], "residues_scored": r["eval_residues"],
                 "draws": r["eval_draws"], "unigram": r["unigram_nll_per_residue"],
                 "gpu": r["config"].get("gpu")})
    s["oadm_eval_fasta_sha256"] = sha256(oadm_dir / "eval_cropped.fasta")
  run_info = (json.loads((out / "sedd_run.json").read_text())
              if (out / "sedd_run.json").exists() else None)
  res = {}
  if run_info and (out / "sedd" / "metrics.jsonl").exists():
    res = residues_at_steps(read_jsonl(out / "sedd" / "metrics.jsonl"),
                            run_info["tokens_per_step"])
    s["sedd_run"] = run_info
  for path in sorted(out.glob("sedd_eval_*.json")):
    e = json.loads(path.read_text())
    name = path.stem[len("sedd_eval_"):]
    per = e["per_sequence"]
    v = np.array([p["nelbo"] for p in per])
    d = np.array([p["tokens"] for p in per])
    rr, se_seq = ratio_se(v, d)
    src = pathlib.Path(e["source"])
    step = int(src.name) if src.name.isdigit() else (max(res) if res else None)
    row = {"model": "sedd_jax", "checkpoint": name, "steps": step,
           "residues": res.get(step) if step is not None else None,
           "wall_s": run_info["wall_s"] if run_info and "final" in name else None,
           "nll": e["nelbo_per_token"], "nll_recomputed": rr, "se_mc": e["se_per_token"],
           "se_seq": se_seq, "sequences": e["num_sequences"], "residues_scored": e["num_tokens"],
           "draws": e["num_samples"], "unigram": e["unigram_nll_per_token"],
           "eval_fasta_sha256": sha256(pathlib.Path(e["data"]))
           if pathlib.Path(e["data"]).exists() else None}
    if oadm_seq is not None:
      if len(v) != len(oadm_seq[0]) or not np.array_equal(d, oadm_seq[1]):
        row["paired"] = "not the same sequences as OA-DM's eval_per_seq.tsv"
      else:
        diff, diff_se = ratio_se(v - oadm_seq[0], d)
        row["minus_oadm"], row["minus_oadm_se"] = diff, diff_se
    rows.append(row)
  s["rows"] = rows
  (out / "summary.json").write_text(json.dumps(s, indent=1))
  head = ("model", "checkpoint", "steps", "residues", "wall_s", "nll", "se_mc", "se_seq",
          "unigram", "minus_oadm", "minus_oadm_se")
  print("\n".join(" | ".join(cells) for cells in [head] + [
      [_cell(k, r.get(k)) for k in head] for r in rows]), flush=True)
  return s


def _cell(key: str, value) -> str:
  if isinstance(value, (int, float)) and key in ("steps", "residues", "wall_s"):
    return f"{value:,.0f}"
  return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="folder for every output (created)")
  p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated of {STAGES}")
  p.add_argument("--seconds", type=float, default=400, help="wall-clock budget of each model")
  p.add_argument("--config", default="configs/uniref50.py:small")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="sedd_jax config override on top of SEDD_DEFAULTS (repeatable)")
  p.add_argument("--ckpt-every", type=int, default=None)
  p.add_argument("--match-residues", type=float, default=None,
                 help="OA-DM's residues trained (default: OUT/oadm/result.json)")
  p.add_argument("--num-samples", type=int, default=32, help="evaluate's draws of t")
  p.add_argument("--eval-batch", type=int, default=64, help="evaluate's rows per call")
  p.add_argument("--eval-fasta", default=None, help="default OUT/oadm/eval_cropped.fasta")
  p.add_argument("--evals", default="ema_final,params_final,matched",
                 help="which sedd_jax evaluations: ema_final, params_final, matched (the EMA "
                 "checkpoint nearest OA-DM's residues)")
  p.add_argument("--oadm-launcher", default="bash .bench/evodiff_oadm/run_on_gpu.sh")
  p.add_argument("--oadm-config", default="38M", choices=("38M", "tiny"))
  p.add_argument("--oadm-warmup", type=int, default=1000)
  p.add_argument("--eval-n", type=int, default=1000, help="OA-DM: first N eval sequences")
  p.add_argument("--eval-draws", type=int, default=16, help="OA-DM: (m, M) draws per sequence")
  p.add_argument("--oadm-extra", default="", help="more train_oadm.py flags")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  stages = [x for x in args.stages.split(",") if x]
  bad = [x for x in stages if x not in STAGES]
  if bad or any(kv.count("=") < 1 for kv in args.set):
    p.error(f"--stages takes {STAGES}, --set KEY=VALUE; got {bad or args.set}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if "export" in stages:
    (out / "export.json").write_text(json.dumps(export(args, out), indent=1))
  if "oadm" in stages and run_oadm(args, out) != 0:
    return 1
  if "sedd" in stages and run_sedd(args, out) != 0:
    return 1
  if "summary" in stages:
    summary(args, out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
