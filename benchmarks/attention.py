"""Attention forward+backward: time and peak memory per backend and length (GPU).

  python benchmarks/attention.py                      # L = 1k, 4k, 16k; xla, cudnn, chunked
  python benchmarks/attention.py --lengths=1024 --backends=cudnn --iters=50

Each case is `jax.grad` of sum(attention(q, k, v) * w) with respect to q, k, v, bf16, all keys
real (lengths = L), batch B = tokens // L (default 65,536 tokens: B 64 at L 1024, the anchor in
shared/REFERENCE.md). Every case runs in its own process (unless --no-isolate) so that the
device's `peak_bytes_in_use` belongs to that case alone and an out-of-memory case cannot
disturb the others. Reported per case: median ms per fwd+bwd, attention TFLOP/s (counting
14 * B * H * L^2 * Dh, i.e. 2 forward + 5 backward matmuls), XLA's compiled memory plan
(arguments + outputs + temporaries) and the measured device peak, in MiB.

Output: a Markdown table on stdout, then one line `JSON {...}` with every number.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

log = logging.getLogger("bench_attention")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_case(backend: str, length: int, args) -> dict:
  """Compiles and times one (backend, length) case in this process; returns its record."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  sys.path.insert(0, ROOT)
  from sedd_jax.model import attention

  dtype = jnp.dtype(args.dtype)
  batch = max(1, args.tokens // length)
  rec = dict(backend=backend, length=length, batch=batch, heads=args.heads,
             head_dim=args.head_dim, dtype=dtype.name, chunk=args.chunk,
             device=jax.devices()[0].device_kind)
  impl = attention.select_backend(backend, dtype, length, args.head_dim)
  if impl != backend:
    rec.update(status=f"n/a (would run {impl})")
    return rec
  shape = (batch, length, args.heads, args.head_dim)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, w = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys)
  lengths = jnp.full((batch,), length, jnp.int32)

  def loss(q, k, v, w, lengths):
    o = attention.dot_product_attention(q, k, v, lengths, backend=backend, chunk=args.chunk)
    return jnp.sum(o.astype(jnp.float32) * w.astype(jnp.float32))

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  try:
    t0 = time.perf_counter()
    compiled = step.lower(q, k, v, w, lengths).compile()
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    mem = compiled.memory_analysis()
    if mem is not None:
      plan = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
      rec["temp_mib"] = round(mem.temp_size_in_bytes / 2**20, 1)
      rec["plan_mib"] = round(plan / 2**20, 1)
    for _ in range(args.warmup):
      jax.block_until_ready(compiled(q, k, v, w, lengths))
    times = []
    for _ in range(args.iters):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(q, k, v, w, lengths))
      times.append(time.perf_counter() - t0)
  except Exception as e:  # noqa: BLE001 -- XlaRuntimeError and friends
    text = str(e)
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    rec.update(status="OOM" if oom else f"error: {type(e).__name__}: {text.splitlines()[0][:200]}")
    return rec
  ms = float(np.median(times)) * 1e3
  flops = 14.0 * batch * args.heads * length * length * args.head_dim
  rec.update(status="ok", ms=round(ms, 3), tflops=round(flops / (ms * 1e-3) / 1e12, 1))
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    rec["peak_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
  return rec


def run_isolated(backend: str, length: int, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--case={backend}:{length}",
         f"--tokens={args.tokens}", f"--heads={args.heads}", f"--head_dim={args.head_dim}",
         f"--dtype={args.dtype}", f"--chunk={args.chunk}", f"--iters={args.iters}",
         f"--warmup={args.warmup}"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
  for line in reversed(res.stdout.splitlines()):
    if line.startswith("CASE "):
      return json.loads(line[5:])
  tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
  return dict(backend=backend, length=length, status=f"crashed (rc {res.returncode}): {tail[0]}")


def table(records: list[dict]) -> str:
  head = ("| backend | L | B | ms fwd+bwd | TFLOP/s | peak MiB (device) | plan MiB (XLA) "
          "| status |")
  lines = [head, "|" + "---|" * 8]
  for r in records:
    lines.append("| {backend} | {length} | {b} | {ms} | {tf} | {peak} | {plan} | {st} |".format(
        backend=r["backend"], length=r["length"], b=r.get("batch", ""), ms=r.get("ms", "-"),
        tf=r.get("tflops", "-"), peak=r.get("peak_mib", "-"), plan=r.get("plan_mib", "-"),
        st=r.get("status", "")))
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--lengths", default="1024,4096,16384")
  p.add_argument("--backends", default="xla,cudnn,chunked")
  p.add_argument("--tokens", type=int, default=65536, help="B = tokens // L")
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--chunk", type=int, default=0, help="chunk of `chunked`; 0 = from L")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--timeout", type=int, default=900, help="seconds per isolated case")
  p.add_argument("--no-isolate", dest="isolate", action="store_false")
  p.add_argument("--case", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

  if args.case:  # child process of run_isolated
    backend, length = args.case.split(":")
    sys.stdout.write("CASE " + json.dumps(run_case(backend, int(length), args)) + "\n")
    return

  records = []
  for length in [int(x) for x in args.lengths.split(",")]:
    for backend in args.backends.split(","):
      log.info("%s L=%d ...", backend, length)
      rec = (run_isolated if args.isolate else run_case)(backend, length, args)
      log.info("  %s", rec)
      records.append(rec)
  sys.stdout.write(table(records) + "\n")
  sys.stdout.write("JSON " + json.dumps({"benchmark": "attention", "records": records}) + "\n")


if __name__ == "__main__":
  main()
