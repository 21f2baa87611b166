"""Fused LayerNorm + adaLN modulate with a hand-derived backward (`model.norm_impl`).

`norm_modulate(x, w, shift, scale)` = LN(x) * w * (1 + scale) + shift: LayerNorm without bias,
eps `layers.LN_EPS`, computed in float32 in the reference's order (((x - mean) * rstd) * w) *
(1 + scale) + shift, with `1 + scale` in scale's dtype as `layers.modulate` does, and returned
in `out_dtype` (the dtype of the matmul it feeds: writing bf16 halves the bytes).

Backward (`jax.custom_vjp`): the forward saves x (the residual stream, kept anyway), w, scale and
the per-row mean and rstd (B, L, 1); x_hat = (x - mean) * rstd is recomputed. With g the output
gradient, a = 1 + scale and dx_hat = g * w * a:

  dx     = rstd * (dx_hat - mean_H(dx_hat) - x_hat * mean_H(dx_hat * x_hat))   (per row)
  P      = sum of g * x_hat, G = sum of g, over the rows sharing one modulation row
           (over L for (B, 1, H) modulation; none for (B, L, H))
  dscale = P * w,  dshift = G,  dw = sum_B,L (P * a)

impl "xla": this math in jnp (XLA fuses it). impl "pallas": two Pallas (Triton) kernels, the
forward and the row-wise part of the backward (dx and P, G summed over each program's rows);
jnp sums those partial sums. Rows are padded to the next power of two (768 -> 1024) with masked
loads and stores, as Triton blocks must be powers of two. Under a jit sharded over the batch
(data parallel) both kernels run on each device's rows (`custom_partitioning`; an opaque
kernel would otherwise be fed the gathered batch). "pallas" needs a GPU (or `interpret=True`,
the tests' Pallas interpreter); `resolve_impl` maps it to "xla" elsewhere.
"reference" is `layers.layer_norm` then `layers.modulate`, differentiated by autodiff (the
parity-tested path). `model.norm_impl = "auto"` (the configs' default) runs "pallas" in bfloat16
on Ampere-or-later GPUs and "reference" everywhere else (`resolve_impl`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sedd_jax.model import attention as attention_lib
from sedd_jax.model import layers

# Pallas' Triton backend: deprecated in jax 0.11 (Mosaic GPU is its successor), and older jax
# (the package allows >= 0.4.35) names its API otherwise; without the names used here, `auto`
# runs the reference and `pallas` the xla impl.
try:
  from jax.experimental.pallas import triton as plgpu
except ImportError:
  plgpu = None
if plgpu is not None and not all(hasattr(plgpu, n) for n in ("CompilerParams", "load", "store")):
  plgpu = None

log = logging.getLogger(__name__)

IMPLS = ("reference", "xla", "pallas")
CHOICES = ("auto",) + IMPLS  # `model.norm_impl`; `resolve_impl` maps "auto" to one of IMPLS


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Pallas work split. fwd_rows: rows per forward program; bwd_rows: rows per backward chunk
  and bwd_chunks: chunks per backward program (its partial sums cover bwd_rows * bwd_chunks
  rows); num_warps of both kernels. Row counts are powers of two; each is cut to what divides
  L (`_divisor`)."""
  fwd_rows: int = 8
  bwd_rows: int = 4
  bwd_chunks: int = 16
  num_warps: int = 4


@dataclasses.dataclass(frozen=True)
class _Options:
  impl: str
  out_dtype: np.dtype
  interpret: bool
  tiling: Tiling


def triton_gpu() -> bool:
  """Whether the default device is a CUDA GPU that runs the Pallas Triton kernels (compute
  capability >= 8.0: Ampere and later, native bf16; a V100 is 7.0) with jax's Pallas Triton
  backend still installed."""
  if plgpu is None:
    return False
  capability = attention_lib.cuda_capability()
  return capability is not None and capability >= (8, 0)


def resolve_impl(impl: str, dtype=jnp.bfloat16) -> str:
  """The impl that `model.norm_impl` (one of CHOICES) runs for compute `dtype` on this machine.

  "auto": "pallas" on a `triton_gpu()` in bfloat16 (the curve and speed of BENCHMARKS.md), else
  "reference" (CPUs, older GPUs, and float32, where the parity tests pin the reference's
  arithmetic). "pallas" without a `triton_gpu()`: "xla", with a logged warning.
  """
  if impl not in CHOICES:
    raise ValueError(f"model.norm_impl {impl!r}: choose one of {CHOICES}")
  if impl == "auto":
    return "pallas" if triton_gpu() and jnp.dtype(dtype) == jnp.bfloat16 else "reference"
  if impl == "pallas" and not triton_gpu():
    device = jax.devices()[0]
    log.warning("model.norm_impl=pallas: %s (%s backend) runs no Pallas Triton kernels; using xla",
                device.device_kind, jax.default_backend())
    return "xla"
  return impl


def norm_modulate(x: jax.Array, w: jax.Array, shift: jax.Array, scale: jax.Array, *, impl: str,
                  out_dtype=jnp.float32, interpret: bool = False,
                  tiling: Tiling = Tiling()) -> jax.Array:
  """LN(x) * w * (1 + scale) + shift (see the module docstring), differentiable in all four.

  Args:
    x: (B, L, H) float, the residual stream (float32 or bfloat16).
    w: (H,) the LayerNorm weight.
    shift, scale: (B, 1, H) (one modulation per row) or (B, L, H) (per token), same shape.
    impl: one of IMPLS.
    out_dtype: the result's dtype (the computation is float32 either way).
    interpret: run the Pallas kernels in the Pallas interpreter (any backend; for tests).
    tiling: the Pallas kernels' `Tiling`.
  Returns:
    (B, L, H) in `out_dtype`.
  """
  if impl not in IMPLS:
    raise ValueError(f"norm_modulate impl {impl!r}: choose one of {IMPLS}")
  if impl == "pallas" and not interpret and jax.default_backend() != "gpu":
    raise ValueError(f"norm_modulate impl 'pallas' needs a GPU (backend "
                     f"{jax.default_backend()!r}); pick the impl with resolve_impl")
  if x.ndim != 3:
    raise ValueError(f"x must be (B, L, H); got shape {x.shape}")
  b, l, h = x.shape
  if w.shape != (h,):
    raise ValueError(f"w must be (H,) = ({h},) for x {x.shape}; got {w.shape}")
  if shift.shape != scale.shape or scale.shape not in ((b, 1, h), (b, l, h)):
    raise ValueError(f"shift and scale must both be (B, 1, H) = ({b}, 1, {h}) or (B, L, H) = "
                     f"{x.shape}; got {shift.shape} and {scale.shape}")
  if impl == "reference":
    return layers.modulate(layers.layer_norm(x, w), shift, scale).astype(out_dtype)
  return _norm_modulate(x, w, shift, scale,
                        _Options(impl, np.dtype(out_dtype), bool(interpret), tiling))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _norm_modulate(x, w, shift, scale, opts: _Options):
  return _fwd(x, w, shift, scale, opts)[0]


def _fwd(x, w, shift, scale, opts: _Options):
  forward = _pallas_forward if opts.impl == "pallas" else _xla_forward
  y, mean, rstd = forward(x, w, shift, scale, opts)
  return y, (x, w, scale, mean, rstd, jnp.zeros((), shift.dtype))


def _bwd(opts: _Options, res, g):
  x, w, scale, mean, rstd, shift_like = res
  backward = _pallas_backward if opts.impl == "pallas" else _xla_backward
  dx, p, g_sum = backward(x, w, scale, mean, rstd, g, opts)
  a = (1 + scale).astype(jnp.float32)
  dw = jnp.sum(p * a, axis=(0, 1))
  return (dx.astype(x.dtype), dw.astype(w.dtype), g_sum.astype(shift_like.dtype),
          (p * w.astype(jnp.float32)).astype(scale.dtype))


_norm_modulate.defvjp(_fwd, _bwd)


def _xla_forward(x, w, shift, scale, opts: _Options):
  """-> y (B, L, H) out_dtype, mean and rstd (B, L, 1) float32."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  xc = xf - mean
  rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + layers.LN_EPS)
  y = xc * rstd * w.astype(jnp.float32) * (1 + scale) + shift
  return y.astype(opts.out_dtype), mean, rstd


def _sum_to(v: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """v (B, L, H) summed over the axes where `shape` has size 1 (keepdims)."""
  axes = tuple(i for i, (n, m) in enumerate(zip(v.shape, shape)) if m == 1 and n != 1)
  return jnp.sum(v, axis=axes, keepdims=True) if axes else v


def _xla_backward(x, w, scale, mean, rstd, g, opts: _Options):
  """-> dx (B, L, H) f32, P = sum g * x_hat and G = sum g over each modulation row's tokens
  (scale's shape), float32."""
  del opts
  xhat = (x.astype(jnp.float32) - mean) * rstd
  g = g.astype(jnp.float32)
  dxhat = g * w.astype(jnp.float32) * (1 + scale)
  dx = rstd * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
               - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
  return dx, _sum_to(g * xhat, scale.shape), _sum_to(g, scale.shape)


# ------------------------------------------------------------------------------ Pallas kernels
# Each program works on `rows` consecutive rows of the (B * L, H) input, padded to (rows, HP),
# HP = next power of two >= H. A program's rows never straddle two batch elements (the row count
# divides L), so per-row modulation is one (1, HP) row: index (first row) // L.


def _divisor(length: int, rows: int) -> int:
  """The largest power of two <= `rows` that divides `length` (1 for odd lengths)."""
  return math.gcd(length, 1 << (max(rows, 1).bit_length() - 1))


def _mask(rows, in_row):
  """(len(rows), HP) bool: the entries within the row's H (masks are built at full shape)."""
  return jnp.broadcast_to(in_row[None, :], (rows.shape[0], in_row.shape[0]))


def _tile(ref, rows, cols, in_row, dtype=jnp.float32):
  """ref[rows, cols] as (len(rows), len(cols)) `dtype`, 0 beyond the row's H entries."""
  v = plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=_mask(rows, in_row), other=0.0)
  return v.astype(dtype)


def _put(ref, rows, cols, in_row, value):
  """ref[rows, cols] = value (len(rows), len(cols)) in ref's dtype, within the rows' H."""
  plgpu.store(ref.at[rows[:, None], cols[None, :]], value.astype(ref.dtype),
              mask=_mask(rows, in_row))


def _mod_rows(first, rows, per_row: int):
  """The modulation rows of data rows `rows` starting at `first`: one, (first // per_row,), for
  per-row modulation (the rows share a batch element), else `rows` itself (per token)."""
  if per_row == 1:
    return rows
  return jax.lax.div(first, per_row) + jnp.zeros((1,), jnp.int32)


def _forward_kernel(x_ref, w_ref, shift_ref, scale_ref, y_ref, mean_ref, rstd_ref, *, rows: int,
                    per_row: int):
  h = x_ref.shape[1]
  first = pl.program_id(0) * rows
  r = first + jnp.arange(rows)
  cols = jnp.arange(pl.next_power_of_2(h))
  in_row = cols < h
  m = _mod_rows(first, r, per_row)
  x = _tile(x_ref, r, cols, in_row)
  mean = jnp.sum(x, axis=1, keepdims=True) / h
  xc = jnp.where(in_row[None, :], x - mean, 0.0)
  rstd = jax.lax.rsqrt(jnp.sum(xc * xc, axis=1, keepdims=True) / h + layers.LN_EPS)
  w = plgpu.load(w_ref.at[cols], mask=in_row, other=0.0).astype(jnp.float32)
  a = (1 + _tile(scale_ref, m, cols, in_row, scale_ref.dtype)).astype(jnp.float32)
  _put(y_ref, r, cols, in_row, xc * rstd * w[None, :] * a + _tile(shift_ref, m, cols, in_row))
  plgpu.store(mean_ref.at[r], mean[:, 0])
  plgpu.store(rstd_ref.at[r], rstd[:, 0])


def _backward_kernel(x_ref, w_ref, scale_ref, mean_ref, rstd_ref, g_ref, dx_ref, p_ref,
                     g_sum_ref=None, *, rows: int, chunks: int, per_row: int):
  """dx per row; per-row modulation: P, G summed over the program's rows into row program_id
  of p_ref, g_sum_ref; per-token modulation (per_row 1): P = g * x_hat per row, no g_sum_ref."""
  h = x_ref.shape[1]
  pid = pl.program_id(0)
  cols = jnp.arange(pl.next_power_of_2(h))
  in_row = cols < h
  w = plgpu.load(w_ref.at[cols], mask=in_row, other=0.0).astype(jnp.float32)[None, :]

  def chunk(i, sums):
    first = (pid * chunks + i) * rows
    r = first + jnp.arange(rows)
    m = _mod_rows(first, r, per_row)
    rstd = plgpu.load(rstd_ref.at[r])[:, None]
    xc = _tile(x_ref, r, cols, in_row) - plgpu.load(mean_ref.at[r])[:, None]
    xhat = jnp.where(in_row[None, :], xc * rstd, 0.0)
    g = _tile(g_ref, r, cols, in_row)
    dxhat = g * w * (1 + _tile(scale_ref, m, cols, in_row, scale_ref.dtype)).astype(jnp.float32)
    c1 = jnp.sum(dxhat * xhat, axis=1, keepdims=True) / h
    c2 = jnp.sum(dxhat, axis=1, keepdims=True) / h
    _put(dx_ref, r, cols, in_row, rstd * (dxhat - c2 - xhat * c1))
    if per_row == 1:
      _put(p_ref, r, cols, in_row, g * xhat)
      return sums
    return (sums[0] + jnp.sum(g * xhat, axis=0, keepdims=True),
            sums[1] + jnp.sum(g, axis=0, keepdims=True))

  zeros = jnp.zeros((1, cols.shape[0]), jnp.float32)
  p, g_sum = jax.lax.fori_loop(0, chunks, chunk, (zeros, zeros))
  if per_row > 1:
    out = pid + jnp.zeros((1,), jnp.int32)
    _put(p_ref, out, cols, in_row, p)
    _put(g_sum_ref, out, cols, in_row, g_sum)


def _batch_partitioned(rule: str):
  """`custom_partitioning` of fn(*arrays, opts) whose rows are independent: under a sharded
  jit every (B, ...) operand and result keeps the sharding of x's batch axis (no all-gather of
  the activations; the kernels run on each device's rows), the others are replicated. `rule`:
  Shardy's einsum-like rule with `b` the batch factor. On one device it is fn itself."""
  # every factor but b, in order of appearance (Shardy wants them sorted)
  factors = tuple(f for f in dict.fromkeys(rule.replace(",", " ").replace("->", " ").split())
                  if f != "b")

  def shardings(mesh, arg_shapes, shapes):
    x_spec = arg_shapes[0].sharding
    batch = x_spec.spec[0] if isinstance(x_spec, NamedSharding) and x_spec.spec else None
    return jax.tree.map(lambda a: NamedSharding(mesh, P(batch) if a.shape and len(a.shape) == 3
                                                 else P()), shapes)

  def wrap(fn):
    part = custom_partitioning(fn, static_argnums=(len(rule.split("->")[0].split(",")),))

    def partition(opts, mesh, arg_shapes, result_shape):
      return (mesh, lambda *a: fn(*a, opts), shardings(mesh, arg_shapes, result_shape),
              shardings(mesh, arg_shapes, arg_shapes))

    part.def_partition(
        partition=partition, sharding_rule=rule, need_replication_factors=factors,
        infer_sharding_from_operands=lambda opts, mesh, args, result: shardings(
            mesh, args, result))
    return part
  return wrap


@_batch_partitioned("b l h, h, b m h, b m h -> b l h, b l k, b l k")
def _pallas_forward(x, w, shift, scale, opts: _Options):
  b, l, h = x.shape
  n = b * l
  per_row = l if scale.shape[1] == 1 else 1
  rows = _divisor(l, opts.tiling.fwd_rows)
  f32 = jnp.float32
  y, mean, rstd = pl.pallas_call(
      functools.partial(_forward_kernel, rows=rows, per_row=per_row),
      out_shape=(jax.ShapeDtypeStruct((n, h), opts.out_dtype), jax.ShapeDtypeStruct((n,), f32),
                 jax.ShapeDtypeStruct((n,), f32)),
      grid=(n // rows,), interpret=opts.interpret, name="norm_modulate_fwd",
      compiler_params=plgpu.CompilerParams(num_warps=opts.tiling.num_warps),
  )(x.reshape(n, h), w, shift.reshape(-1, h), scale.reshape(-1, h))
  return y.reshape(b, l, h), mean.reshape(b, l, 1), rstd.reshape(b, l, 1)


@_batch_partitioned("b l h, h, b m h, b l k, b l k, b l h -> b l h, b m h, b m h")
def _pallas_backward(x, w, scale, mean, rstd, g, opts: _Options):
  b, l, h = x.shape
  n = b * l
  per_row = l if scale.shape[1] == 1 else 1
  rows = _divisor(l, opts.tiling.bwd_rows)
  chunks = _divisor(l // rows, opts.tiling.bwd_chunks)
  programs = n // (rows * chunks)
  f32 = jnp.float32
  sums = (jax.ShapeDtypeStruct((programs, h), f32),) * 2 if per_row > 1 else (
      jax.ShapeDtypeStruct((n, h), f32),)
  dx, p, *g_sum = pl.pallas_call(
      functools.partial(_backward_kernel, rows=rows, chunks=chunks, per_row=per_row),
      out_shape=(jax.ShapeDtypeStruct((n, h), x.dtype), *sums),
      grid=(programs,), interpret=opts.interpret, name="norm_modulate_bwd",
      compiler_params=plgpu.CompilerParams(num_warps=opts.tiling.num_warps),
  )(x.reshape(n, h), w, scale.reshape(-1, h), mean.reshape(n), rstd.reshape(n), g.reshape(n, h))
  if per_row == 1:
    return dx.reshape(b, l, h), p.reshape(b, l, h), g.astype(f32)
  return (dx.reshape(b, l, h), p.reshape(b, -1, h).sum(axis=1, keepdims=True),
          g_sum[0].reshape(b, -1, h).sum(axis=1, keepdims=True))
