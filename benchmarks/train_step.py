"""Throughput and peak memory of the isolated training step (the one `sedd_jax.train` runs).

SEDD-small shape by default (configs/uniref50.py:small: 768 hidden, 12 blocks, 12 heads,
cond 128, dropout 0.1, EMA, AdamW, clip, bf16), absorbing graph, 33-class protein vocabulary,
random tokens at full length. Each case: compile, warm up, then time `--steps` steps `--repeats`
times; the median repeat gives tokens/s. Model FLOP utilisation uses the REFERENCE.md count
(6 * non-embedding params + 12 * blocks * L * hidden per token) against the H100's data-sheet bf16
peak (989 TFLOP/s) and the measured matmul ceiling (769 TFLOP/s).

  python benchmarks/train_step.py --case 1024x64 --case 512x128 --attention cudnn,xla

Prints a table and one JSON line per case (prefix `JSON `).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, "configs")
import uniref50  # noqa: E402

from sedd_jax.training import step as step_lib  # noqa: E402

PEAK_TFLOPS = 989.0
MATMUL_TFLOPS = 769.0
log = logging.getLogger("train_step")


def peak_gib() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 2**30


def time_steps(step, state, args: tuple, steps: int, repeats: int, warmup: int = 3):
  """`state, metrics = step(state, *args)` warmed up, then `repeats` timed runs of `steps` steps.

  Returns (state, last metrics, seconds per step of each repeat).
  """
  for _ in range(warmup):
    state, metrics = step(state, *args)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, *args)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t0) / steps)
  return state, metrics, times


def run_case(length: int, batch: int, attention: str, dropout: float, remat: str, dtype: str,
             steps: int, repeats: int, variant: str) -> dict:
  cfg = uniref50.get_config(variant)
  cfg.model.update(length=length, attention=attention, dropout=dropout, remat=remat, dtype=dtype)
  cfg.training.batch_size = batch
  cfg.data.pad_to = "full"  # random tokens, one sequence per row
  s = step_lib.setup(cfg)
  state, n_params = s.state, s.n_params
  train_step = s.train_step()
  rng = np.random.default_rng(0)
  batch_np = {"tokens": rng.integers(4, 29, (batch, length), dtype=np.int32),
              "lengths": np.full((batch,), length, np.int32)}
  data = s.put_batch(batch_np)

  t0 = time.perf_counter()
  state, metrics = train_step(state, s.rest, data)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  state, metrics, times = time_steps(train_step, state, (s.rest, data), steps, repeats)
  step_s = statistics.median(times)
  tok_s = batch * length / step_s
  fpt = step_lib.flops_per_token(cfg, n_params, s.task.graph.dim)
  return {
    "bench": "train_step", "device": jax.devices()[0].device_kind, "jax": jax.__version__,
    "date": time.strftime("%Y-%m-%d"), "L": length, "B": batch, "attention": attention,
    "dropout": dropout, "remat": remat, "dtype": dtype, "params_M": round(n_params / 1e6, 2),
    "step_ms": round(step_s * 1e3, 2), "tokens_per_s": round(tok_s),
    "mfu_datasheet": round(tok_s * fpt / 1e12 / PEAK_TFLOPS, 4),
    "mfu_matmul": round(tok_s * fpt / 1e12 / MATMUL_TFLOPS, 4),
    "peak_gib": round(peak_gib(), 2), "compile_s": round(compile_s, 1),
    "loss": float(metrics["loss"]),
  }


def _subprocess_case(args, case: str, attention: str, dropout: float, remat: str) -> dict:
  """Runs one case in a fresh process, so that its peak memory is its own."""
  cmd = [sys.executable, __file__, "--in-process", "--case", case, "--attention", attention,
         "--dropout", str(dropout), "--remat", remat, "--dtype", args.dtype, "--variant",
         args.variant, "--steps", str(args.steps), "--repeats", str(args.repeats)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  for line in proc.stdout.splitlines():
    if line.startswith("JSON "):
      return json.loads(line[5:])
  length, batch = case.split("x")
  return {"bench": "train_step", "L": int(length), "B": int(batch), "attention": attention,
          "dropout": dropout, "remat": remat, "error": proc.stderr.strip()[-300:]}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--case", action="append", default=None, help="LxB, e.g. 1024x64 (repeatable)")
  p.add_argument("--attention", default="cudnn,xla", help="comma-separated backends")
  p.add_argument("--dropout", default="0.1", help="comma-separated dropout rates")
  p.add_argument("--remat", default="none")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--variant", default="small")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  cases = args.case or ["1024x64", "512x128"]
  rows = []
  for case in cases:
    length, batch = (int(v) for v in case.split("x"))
    for attention in args.attention.split(","):
      for dropout in (float(d) for d in args.dropout.split(",")):
        for remat in args.remat.split(","):
          if args.in_process:
            row = run_case(length, batch, attention, dropout, remat, args.dtype, args.steps,
                           args.repeats, args.variant)
            print("JSON " + json.dumps(row), flush=True)
            return
          row = _subprocess_case(args, case, attention, dropout, remat)
          rows.append(row)
          print("JSON " + json.dumps(row), flush=True)
  print(f"{'L':>6} {'B':>4} {'attn':>8} {'drop':>5} {'remat':>16} {'ms/step':>9} {'tok/s':>10} "
        f"{'MFU(989)':>9} {'MFU(769)':>9} {'peak GiB':>9}")
  for r in rows:
    if "error" in r:
      print(f"{r['L']:>6} {r['B']:>4} {r['attention']:>8} {r['dropout']:>5} {r['remat']:>16}  "
            f"ERROR {r['error'][:80]}")
      continue
    print(f"{r['L']:>6} {r['B']:>4} {r['attention']:>8} {r['dropout']:>5} {r['remat']:>16} "
          f"{r['step_ms']:>9} {r['tokens_per_s']:>10} {r['mfu_datasheet']:>9} "
          f"{r['mfu_matmul']:>9} {r['peak_gib']:>9}")


if __name__ == "__main__":
  main()
