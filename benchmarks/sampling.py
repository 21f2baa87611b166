"""Sampler throughput: sequences/s and tokens/s of the full reverse process.

  python benchmarks/sampling.py                      # SEDD-small, L 512, N 256, bf16
  python benchmarks/sampling.py --steps 128 --batch 16 --variants cached
  python benchmarks/sampling.py --tiny               # CPU smoke run of the script

SEDD-small shape (hidden 768, 12 blocks, 12 heads, cond 128), absorbing graph over the ESM-2
vocabulary (33 classes), random weights (the output layer is re-drawn so that the scores are
not uniform), bf16 compute, the 20 standard amino acids allowed (as the sample CLI). For each
step count and variant (uncached | cached) it compiles once, runs once to warm up, then times
`--repeats` runs of one batch of N sequences of length L (each a fresh key) and reports the
median. The cached variant reuses the model output on steps where no token of the batch changed
(sedd_jax.sampling.sampler); `model_calls` counts the model evaluations actually made.
Prints a table and one JSON line (prefix `JSON `).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "configs"))

logger = logging.getLogger("benchmarks.sampling")


def add_model_args(p: argparse.ArgumentParser) -> None:
  """The flags `build_model` reads: --batch, --length, --dtype, --attention, --tiny."""
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--attention", default="auto", help="model.attention backend")
  p.add_argument("--tiny", action="store_true", help="a tiny model, for a CPU smoke run")


def build_model(args):
  """(cfg, graph, noise, model, allowed) for the benchmark: SEDD-small (or --tiny) of
  args.length / args.dtype / args.attention, random weights with a re-drawn output layer, the
  20 standard amino acids allowed."""
  import numpy as np

  import uniref50
  from sedd_jax import diffusion
  from sedd_jax.training import state as state_lib

  cfg = uniref50.get_config("small")
  cfg.model.update(length=args.length, dtype=args.dtype, attention=args.attention, dropout=0.0)
  if args.tiny:
    cfg.model.update(hidden_size=64, n_heads=4, n_blocks=2, cond_dim=32)
  graph = diffusion.get_graph(cfg.graph)
  noise = diffusion.get_noise(cfg.noise)
  model = state_lib.build_model(cfg, graph, seed=0)
  kernel = model.output_layer.linear.kernel
  kernel[...] = 0.02 * np.random.default_rng(0).normal(size=kernel.shape).astype(np.float32)
  allowed = np.zeros((graph.dim,), bool)
  allowed[4:24] = True
  return cfg, graph, noise, model, allowed


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, nargs="+", default=[128, 256, 1024])
  p.add_argument("--predictor", default="analytic", choices=("analytic", "euler"))
  p.add_argument("--variants", nargs="+", default=["uncached", "cached"],
                 choices=("uncached", "cached"))
  p.add_argument("--repeats", type=int, default=2)
  add_model_args(p)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

  import jax
  import numpy as np

  from sedd_jax.sampling import sampler

  cfg, graph, noise, model, allowed = build_model(args)
  shape = (args.batch, args.length)
  device = jax.devices()[0]
  logger.info("device %s; model %s; N %d, L %d, %s", device.device_kind,
              {k: cfg.model[k] for k in ("hidden_size", "n_blocks", "n_heads", "cond_dim",
                                         "dtype", "attention")}, args.batch, args.length,
              args.predictor)

  rows = []
  for steps in args.steps:
    for variant in args.variants:
      run = sampler.jit_sampler(graph, noise, shape, steps=steps, predictor=args.predictor,
                                cached=variant == "cached", model=model, return_nfe=True)
      t0 = time.perf_counter()
      x, nfe = run(jax.random.key(0), None, None, None, allowed)
      jax.block_until_ready(x)
      compile_s = time.perf_counter() - t0
      times, calls = [], []
      for r in range(args.repeats):
        t0 = time.perf_counter()
        x, nfe = run(jax.random.key(r + 1), None, None, None, allowed)
        x = jax.block_until_ready(x)
        times.append(time.perf_counter() - t0)
        calls.append(int(nfe))
      x = np.asarray(x)
      assert ((x >= 4) & (x < 24)).all(), "sampler emitted a non-residue token"
      sec = statistics.median(times)
      rows.append({"steps": steps, "variant": variant, "seconds": sec,
                   "seq_per_s": args.batch / sec, "tokens_per_s": args.batch * args.length / sec,
                   "model_calls": statistics.median(calls), "first_call_s": compile_s})
      logger.info("%s", rows[-1])
  base = {r["steps"]: r["seconds"] for r in rows if r["variant"] == "uncached"}
  for r in rows:
    r["speedup_vs_uncached"] = base[r["steps"]] / r["seconds"] if r["steps"] in base else None

  head = (f"{'steps':>6} {'variant':>9} {'seconds':>9} {'seq/s':>9} {'tokens/s':>11} "
          f"{'calls':>7} {'speedup':>8}")
  lines = [head, "-" * len(head)]
  for r in rows:
    sp = f"{r['speedup_vs_uncached']:.2f}x" if r["speedup_vs_uncached"] else "-"
    lines.append(f"{r['steps']:>6} {r['variant']:>9} {r['seconds']:>9.2f} {r['seq_per_s']:>9.2f} "
                 f"{r['tokens_per_s']:>11.0f} {r['model_calls']:>7.0f} {sp:>8}")
  sys.stdout.write("\n".join(lines) + "\n")
  sys.stdout.write("JSON " + json.dumps({
      "benchmark": "sampling", "device": device.device_kind, "batch": args.batch,
      "length": args.length, "predictor": args.predictor, "dtype": args.dtype,
      "model": "tiny" if args.tiny else "sedd-small", "jax": jax.__version__, "rows": rows}) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
