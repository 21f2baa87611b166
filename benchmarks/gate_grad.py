"""The gated residual add x + gate * y, forward + backward: `model.gate_grad` side by side (GPU).

One DDiT-small gate of the step at L=1024, B=64: x (64, 1024, 768) float32 (the residual
stream), gate (64, 1, 768) bfloat16 (the adaLN matmul's output), y (64, 1024, 768) bfloat16 (the
branch output) and a float32 output gradient; fwd+bwd = the sum and its three gradients.
Variants: xla and blocked at each `--blocks` entry. On an H200 (2026-12-01): xla 0.433 ms,
blocked 0.392 / 0.391 / 0.314 ms at c = 8 / 16 / 32.

For each variant: median ms over `--repeats` of `--iters` calls, the effective bandwidth of the
minimal traffic (forward: read x f32 and y bf16, write f32; backward: read g f32 and y bf16,
write dy bf16), the transposes in XLA's compiled program (`count_transposes`; the step's gates
are transposed there, alone XLA may lay the reduction out otherwise), and the largest error
against xla relative to xla's largest entry. One line `JSON {...}` per measurement.

  python benchmarks/gate_grad.py
  python benchmarks/gate_grad.py --shape 2x64x48 --iters 1 --repeats 1  # CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import time

import jax
import jax.numpy as jnp

from norm_modulate import rel_error, time_ms  # benchmarks/norm_modulate.py, beside this script
from sedd_jax.model import gate_grad as gg

log = logging.getLogger("gate_grad")


def count_transposes(hlo: str) -> int:
  """HLO instructions that are transposes or fusions XLA named for a transpose (GPU:
  `input_transpose_fusion` and the like), fused computations' insides included."""
  n = 0
  for line in hlo.splitlines():
    name, sep, rhs = line.strip().partition(" = ")
    if sep and (re.match(r"\S+ transpose\(", rhs) or
                ("transpose" in name and re.match(r"\S+ fusion\(", rhs))):
      n += 1
  return n


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="64x1024x768", help="BxLxH of x")
  p.add_argument("--blocks", default="8,16,32", help="comma-separated blocked first-stage sizes")
  p.add_argument("--residual-dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  b, l, h = (int(v) for v in args.shape.split("x"))
  res = jnp.dtype(args.residual_dtype)
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (b, l, h), jnp.float32).astype(res)
  gate = (0.2 * jax.random.normal(k[1], (b, 1, h), jnp.float32)).astype(jnp.bfloat16)
  y = jax.random.normal(k[2], (b, l, h), jnp.float32).astype(jnp.bfloat16)
  g = jax.random.normal(k[3], (b, l, h), jnp.float32).astype(res)
  n = b * l * h
  fwd_bytes = n * (2 * res.itemsize + 2)
  bwd_bytes = n * (res.itemsize + 2 + 2)

  variants = [("xla", {})] + [("blocked", {"block": int(c)}) for c in args.blocks.split(",")]
  want = None
  for impl, kw in variants:
    row = {"bench": "gate_grad", "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "date": time.strftime("%Y-%m-%d"), "shape": [b, l, h], "residual": res.name,
           "impl": impl, "block": kw.get("block")}
    fn = functools.partial(gg.residual_add, impl=impl, **kw)
    try:
      both = jax.jit(lambda x, gate, y, g, fn=fn: (lambda o, vjp: (o, *vjp(g)))(
          *jax.vjp(fn, x, gate, y)))
      t0 = time.perf_counter()
      compiled = both.lower(x, gate, y, g).compile()
      got = compiled(x, gate, y, g)
      jax.block_until_ready(got)
      row["compile_s"] = round(time.perf_counter() - t0, 2)
      row["transposes"] = count_transposes(compiled.as_text())
      if want is None:
        want = got
      ms = time_ms(compiled, (x, gate, y, g), args.iters, args.repeats)
      row.update(fwd_bwd_ms=round(ms, 4),
                 fwd_bwd_gbps=round((fwd_bytes + bwd_bytes) / ms / 1e6, 1),
                 max_rel_err_out_dx_dy=rel_error([got[i] for i in (0, 1, 3)],
                                                 [want[i] for i in (0, 1, 3)]),
                 max_rel_err_dgate=rel_error(got[2], want[2]))
    except Exception as e:  # noqa: BLE001 -- one failing variant must not hide the others
      row["error"] = f"{type(e).__name__}: {e}"[:300]
    print("JSON " + json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
