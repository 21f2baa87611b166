"""Long sequences: time and peak memory of a SEDD-small forward pass at B = 1 and large L.

Each length runs in a fresh process (so that peak memory is its own): build the model
(configs/uniref50.py:small, bf16, eval mode), compile, warm up, time `--repeats` forwards.
Training-step figures at long L come from benchmarks/train_step.py (`--case 16384x4`).

  python benchmarks/long_context.py --lengths 16384,65536 --attention auto
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def run_one(length: int, attention: str, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  sys.path.insert(0, "configs")
  import uniref50

  from sedd_jax import diffusion
  from sedd_jax.training import state as state_lib

  cfg = uniref50.get_config("small")
  cfg.model.update(length=length, attention=attention, dropout=0.0)
  graph = diffusion.get_graph(cfg.graph)
  model = state_lib.build_model(cfg, graph)
  model.eval()
  graphdef, params = nnx.split(model)

  @jax.jit
  def forward(params, x, sigma):
    return nnx.merge(graphdef, params)(x, sigma).mean()

  x = jax.random.randint(jax.random.key(0), (1, length), 4, 29)
  sigma = jnp.ones((1,), jnp.float32)
  t0 = time.perf_counter()
  jax.block_until_ready(forward(params, x, sigma))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(forward(params, x, sigma))
    times.append(time.perf_counter() - t0)
  stats = jax.devices()[0].memory_stats() or {}
  ms = statistics.median(times) * 1e3
  return {"bench": "long_context_forward", "device": jax.devices()[0].device_kind,
          "date": time.strftime("%Y-%m-%d"), "L": length, "B": 1, "attention": attention,
          "ms": round(ms, 2), "us_per_token": round(ms * 1e3 / length, 3),
          "peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
          "compile_s": round(compile_s, 1)}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", default="16384,65536")
  p.add_argument("--attention", default="auto")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--in-process", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.in_process:
    print("JSON " + json.dumps(run_one(args.in_process, args.attention, args.repeats)))
    return
  rows = []
  for length in (int(v) for v in args.lengths.split(",")):
    proc = subprocess.run([sys.executable, __file__, "--in-process", str(length), "--attention",
                           args.attention, "--repeats", str(args.repeats)],
                          capture_output=True, text=True)
    row = next((json.loads(l[5:]) for l in proc.stdout.splitlines() if l.startswith("JSON ")),
               {"L": length, "error": proc.stderr.strip()[-300:]})
    rows.append(row)
    print("JSON " + json.dumps(row), flush=True)
  print(f"{'L':>7} {'ms':>9} {'us/token':>9} {'peak GiB':>9}")
  for r in rows:
    if "error" in r:
      print(f"{r['L']:>7}  ERROR {r['error'][:100]}")
    else:
      print(f"{r['L']:>7} {r['ms']:>9} {r['us_per_token']:>9} {r['peak_gib']:>9}")


if __name__ == "__main__":
  main()
