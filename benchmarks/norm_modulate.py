"""LayerNorm + adaLN modulate forward and forward+backward: `model.norm_impl` side by side (GPU).

One DDiT-small norm site of the step at L=1024, B=64: x (64, 1024, 768) float32 (the residual
stream), w (768,) float32, shift/scale (64, 1, 768) bfloat16 (the adaLN matmul's output), the
result in bfloat16 (what the next matmul reads) and a bfloat16 output gradient. fwd+bwd = the
forward and all four gradients (x, w, shift, scale). Variants: reference, xla, and pallas at each `--tilings` entry
(`norm_modulate.Tiling` fields fwd_rows/bwd_rows/bwd_chunks/num_warps).

For each variant: median ms over `--repeats` of `--iters` calls, the effective bandwidth of the
minimal traffic (forward: read x f32, write y bf16; backward: read x f32 and g bf16, write dx
f32), and the largest error against the reference relative to the reference's largest entry.
One line `JSON {...}` per measurement; under a minute on an H200.

  python benchmarks/norm_modulate.py
  python benchmarks/norm_modulate.py --shape 2x8x48 --iters 1 --repeats 1 --interpret  # CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import time

import jax
import jax.numpy as jnp

from sedd_jax.model import norm_modulate as nm

log = logging.getLogger("norm_modulate")

TILINGS = ("8/4/16/4", "4/4/16/4", "16/8/8/4", "8/8/8/8", "1/1/64/1")


def parse_tiling(spec: str) -> nm.Tiling:
  """'8/4/16/4' -> Tiling(fwd_rows=8, bwd_rows=4, bwd_chunks=16, num_warps=4)."""
  fields = [int(v) for v in spec.split("/")]
  if len(fields) != 4 or min(fields) < 1:
    raise ValueError(f"tiling {spec!r}: four positive integers fwd_rows/bwd_rows/bwd_chunks/"
                     f"num_warps")
  return nm.Tiling(*fields)


def time_ms(fn, args, iters: int, repeats: int) -> float:
  """Median over `repeats` of the mean ms per call of `iters` calls (after one warm-up)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / iters * 1e3)
  return statistics.median(times)


def rel_error(got, want) -> float:
  """max |got - want| / max |want| over all leaves (float32)."""
  errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
               / max(float(jnp.max(jnp.abs(b.astype(jnp.float32)))), 1e-30))
          for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
  return max(errs)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="64x1024x768", help="BxLxH of x")
  p.add_argument("--tilings", default=",".join(TILINGS), help="comma-separated fwd_rows/"
                 "bwd_rows/bwd_chunks/num_warps of the pallas variants")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke run)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  b, l, h = (int(v) for v in args.shape.split("x"))
  tilings = [parse_tiling(t) for t in args.tilings.split(",")]
  k = jax.random.split(jax.random.key(0), 5)
  x = 2.0 * jax.random.normal(k[0], (b, l, h), jnp.float32) + 0.3
  w = 1.0 + 0.1 * jax.random.normal(k[1], (h,), jnp.float32)
  shift = jax.random.normal(k[2], (b, 1, h), jnp.float32).astype(jnp.bfloat16)
  scale = (0.2 * jax.random.normal(k[3], (b, 1, h), jnp.float32)).astype(jnp.bfloat16)
  g = jax.random.normal(k[4], (b, l, h), jnp.float32).astype(jnp.bfloat16)
  inputs = (x, w, shift, scale)
  n = b * l * h
  fwd_bytes, bwd_bytes = n * (4 + 2), n * (4 + 2 + 4)

  variants = [("reference", nm.Tiling()), ("xla", nm.Tiling())] + [("pallas", t) for t in tilings]

  def fwd_bwd(fn):
    return jax.jit(lambda x, w, shift, scale, g: jax.vjp(fn, x, w, shift, scale)[1](g))

  want = None
  for impl, tiling in variants:
    row = {"bench": "norm_modulate", "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "shape": [b, l, h],
           "impl": impl, "tiling": None if impl != "pallas" else
           "/".join(str(v) for v in (tiling.fwd_rows, tiling.bwd_rows, tiling.bwd_chunks,
                                     tiling.num_warps))}
    fn = functools.partial(nm.norm_modulate, impl=impl, out_dtype=jnp.bfloat16,
                           interpret=args.interpret, tiling=tiling)
    try:
      fwd, both = jax.jit(fn), fwd_bwd(fn)
      t0 = time.perf_counter()
      got = (fwd(*inputs), both(*inputs, g))
      jax.block_until_ready(got)
      row["compile_s"] = round(time.perf_counter() - t0, 2)
      if want is None:
        want = got
      fwd_ms = time_ms(fwd, inputs, args.iters, args.repeats)
      both_ms = time_ms(both, (*inputs, g), args.iters, args.repeats)
      row.update(fwd_ms=round(fwd_ms, 4), fwd_bwd_ms=round(both_ms, 4),
                 fwd_gbps=round(fwd_bytes / fwd_ms / 1e6, 1),
                 fwd_bwd_gbps=round((fwd_bytes + bwd_bytes) / both_ms / 1e6, 1),
                 max_rel_err_y=rel_error(got[0], want[0]),
                 max_rel_err_grads=rel_error(got[1], want[1]))
    except Exception as e:  # noqa: BLE001 -- one failing tiling must not hide the others
      row["error"] = f"{type(e).__name__}: {e}"[:300]
    print("JSON " + json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
