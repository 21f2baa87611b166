"""The gated residual add of the adaLN blocks, x + gate * y, with a choice of backward
(`model.gate_grad`).

`residual_add(x, gate, y)` = (x + gate * y) computed in float32 and stored in x's dtype (the
residual stream's); x and y are (B, L, H), gate is (B, 1, H) (one gate row per batch element,
the adaLN matmul's output). With g the output gradient (in x's dtype) the gradients are

  dx = g,   dy = (g * gate) in y's dtype,   dgate[b, 0, h] = sum_l g[b, l, h] * y[b, l, h]

(float32 products and sums, dgate stored in gate's dtype): what autodiff of the formula gives.
dgate is a sum over L, the middle axis; on the GPU XLA lays that reduction out with L minor and
writes g (f32) and y (bf16) a second time, transposed to (B, H, L), for each of the 24 gates of a
DDiT-small step (BENCHMARKS.md, "Seventh session: where the 13 ms of copies and transposes come
from": about 4.5-5 ms of a 112 ms step). The impls:

* "xla": the formula, differentiated by autodiff.
* "blocked" (the default): a `jax.custom_vjp` whose dgate sums g * y in two stages:
  (B, L / c, c, H) summed over the c axis (a non-minor axis of small extent, H minor: a column
  reduction that needs no transpose), then over L / c. An `optimization_barrier` keeps the
  stages apart: XLA's algebraic simplifier merges a reduce of a reduce back into the one
  reduce over L (seen on the CPU).
  c = `BLOCK` (32: the fastest of 8, 16, 32 alone, and the only one whose compiled gate has no
  transposes left), or a plain sum when c does not divide L.

Measured on an H200 (2026-12-01, BENCHMARKS.md): one gate's forward + backward at 64x1024x768
(float32 residual) 0.433 ms xla, 0.391 ms blocked c=16, 0.314 ms c=32; the DDiT-small step at
1024x64 1.8% faster with "blocked" (c=32: 110.63 against 112.65 ms; c=16 111.54), +1.1 GiB XLA
memory estimate, and its training curve on the reference's (1,500 steps: 0.0007 below the
default's), so it is the default.

Both impls give the same numbers up to the order of the float32 sums of dgate; dx and dy are
bit for bit the formula's. A gate that is not (B, 1, H) runs the "xla" formula whatever the
impl.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CHOICES = ("xla", "blocked")  # `model.gate_grad`
BLOCK = 32  # "blocked": the extent c of the first stage's (column) reduction


def formula(x: jax.Array, gate: jax.Array, y: jax.Array) -> jax.Array:
  """x + gate * y computed in float32, stored in x's dtype (the residual stream's)."""
  return (x.astype(jnp.float32) + gate.astype(jnp.float32) * y.astype(jnp.float32)).astype(x.dtype)


def residual_add(x: jax.Array, gate: jax.Array, y: jax.Array, *, impl: str = "xla",
                 block: int | None = None) -> jax.Array:
  """x + gate * y (see the module docstring), differentiable in all three.

  Args:
    x: (B, L, H) float32 or bfloat16, the residual stream.
    gate: (B, 1, H) (other shapes that broadcast run the "xla" formula).
    y: (B, L, H), the branch output (bfloat16 under bf16 compute).
    impl: one of CHOICES.
    block: "blocked"'s first-stage extent c; None = `BLOCK`.
  Returns:
    (B, L, H) in x's dtype.
  """
  if impl not in CHOICES:
    raise ValueError(f"residual_add impl {impl!r}: choose one of {CHOICES}")
  per_row_gate = x.ndim == 3 and y.shape == x.shape and gate.shape == (x.shape[0], 1, x.shape[2])
  if impl == "xla" or not per_row_gate:
    return formula(x, gate, y)
  return _blocked(x, gate, y, int(BLOCK if block is None else block))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(x, gate, y, block: int):
  del block
  return formula(x, gate, y)


def _fwd(x, gate, y, block: int):
  del block
  return formula(x, gate, y), (gate, y)


def _bwd(block: int, res, g):
  """g (B, L, H) in x's dtype -> dx = g, dgate (B, 1, H) in gate's dtype, dy in y's dtype."""
  gate, y = res
  gf = g.astype(jnp.float32)
  dy = (gf * gate.astype(jnp.float32)).astype(y.dtype)
  return g, _gate_sum(gf, y, block).astype(gate.dtype), dy


_blocked.defvjp(_fwd, _bwd)


def _gate_sum(g: jax.Array, y: jax.Array, c: int) -> jax.Array:
  """sum over L of g * y in two stages of c, then L / c: g (B, L, H) float32, y (B, L, H) ->
  (B, 1, H) float32 (one stage when c does not divide L)."""
  b, l, h = g.shape
  prod = g * y.astype(jnp.float32)
  if c <= 1 or l % c or l == c:
    return jnp.sum(prod, axis=1, keepdims=True)
  partial = jnp.sum(prod.reshape(b, l // c, c, h), axis=2)  # (B, L / c, H)
  # without the barrier XLA merges the two reduces into the one over L
  return jnp.sum(jax.lax.optimization_barrier(partial), axis=1, keepdims=True)
