"""FP8 matmuls for the DDiT's blocks (`model.matmul = "fp8"` on FP8 GPUs).

`fp8_matmul(x, w)`: both operands quantized per tensor (current scaling, power-of-two scales)
to float8, multiplied with float32 accumulation, gradients through the same FP8 path;
`fp8_dot_general` is its `nnx.Linear(dot_general=...)` form; `fp8_available()` says whether the
devices have FP8 tensor cores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sedd_jax.model import attention


def fp8_available() -> bool:
  """Whether the default backend's devices have FP8 tensor cores (CUDA compute capability
  >= 8.9: Ada, Hopper and newer)."""
  cc = attention.cuda_capability()
  return cc is not None and cc >= (8, 9)


def _quantize(x: jax.Array, f8) -> tuple[jax.Array, jax.Array]:
  """x -> (x / s as `f8`, s): per-tensor current scaling, s = the power of two at or above
  amax|x| / max(f8) (1 for x = 0); a power of two, so that dequantizing in bf16 is exact."""
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  ratio = amax / jnp.float32(jnp.finfo(f8).max)
  s = jnp.where(amax > 0, jnp.exp2(jnp.ceil(jnp.log2(ratio))), jnp.float32(1))
  return (x.astype(jnp.float32) / s).astype(f8), s


def _scaled_dot(a_q, a_s, b_q, b_s, dims, dtype):
  """dot_general of the dequantized operands `convert(q) * s`: the form XLA's GEMM rewriter
  turns into one FP8 cuBLASLt matmul with the scales as its alpha on FP8 GPUs."""
  a = a_q.astype(dtype) * a_s.astype(dtype)
  b = b_q.astype(dtype) * b_s.astype(dtype)
  return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=dtype)


@jax.custom_vjp
def fp8_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x (M, K) @ w (K, N) -> (M, N) in x's dtype, operands in float8_e4m3fn with per-tensor
  scales; the backward pass quantizes the output gradient to float8_e5m2 (its range), and saves
  the FP8 operands (not x, w) for it."""
  return _fp8_fwd(x, w)[0]


def _fp8_fwd(x, w):
  xq, xs = _quantize(x, jnp.float8_e4m3fn)
  wq, ws = _quantize(w, jnp.float8_e4m3fn)
  dtypes = (jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))  # the cotangents' dtypes
  return _scaled_dot(xq, xs, wq, ws, ((1,), (0,)), x.dtype), (xq, xs, wq, ws, dtypes)


def _fp8_bwd(res, g):
  xq, xs, wq, ws, (x_like, w_like) = res
  gq, gs = _quantize(g, jnp.float8_e5m2)
  dx = _scaled_dot(gq, gs, wq, ws, ((1,), (1,)), g.dtype)  # (M, N) . (K, N) -> (M, K)
  dw = _scaled_dot(xq, xs, gq, gs, ((0,), (0,)), g.dtype)  # (M, K) . (M, N) -> (K, N)
  return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


fp8_matmul.defvjp(_fp8_fwd, _fp8_bwd)


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                    out_sharding=None):
  """`lax.dot_general` replacement for nnx.Linear: lhs (..., K) . rhs (K, N) by `fp8_matmul`."""
  del precision, preferred_element_type, out_sharding  # FP8 sets its own
  if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2:
    raise ValueError(f"fp8_dot_general handles x (..., K) . w (K, N) only; got "
                     f"{lhs.shape} . {rhs.shape} with {dimension_numbers}")
  y = fp8_matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
  return y.reshape(*lhs.shape[:-1], rhs.shape[1])
