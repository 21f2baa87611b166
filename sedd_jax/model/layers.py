"""The layers of the DDiT (and of the protein-ligand model's two tracks), in Flax NNX.

The sigma embedding (`timestep_embedding`, `TimestepEmbedder`), rotate-half rotary embeddings
(`rotary_cos_sin`, `apply_rotary`), adaLN's `modulate`, the bias-free float32 `layer_norm` and
its `LayerNorm` module, torch-initialised `linear` layers, dropout with three bit generators
(`dropout_bits`) and the output head `score_head` (the `scale_by_sigma` parametrisation of
absorbing graphs). Numerically the reference's (`SEDD`'s) layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# How DDiT dropout masks get their random bits (see `dropout_bits`).
DROPOUT_RNGS = ("threefry", "rbg", "hash")
FREQ_DIM = 256  # sinusoidal sigma embedding size
LN_EPS = 1e-5
ROTARY_BASE = 10_000


def timestep_embedding(sigma: jax.Array, dim: int = FREQ_DIM, max_period: float = 10_000):
  """Sinusoidal embedding: sigma (B,) -> (B, dim) float32, [cos(args), sin(args)]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = sigma.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def rotary_cos_sin(length: int, head_dim: int, base: float = ROTARY_BASE,
                   positions: jax.Array | None = None):
  """cos, sin tables float32 of rotate-half rotary embeddings: (length, head_dim) at positions
  0..length-1, or (B, L, head_dim) at `positions` (B, L) (packed rows: each residue's index
  within its own sequence)."""
  inv_freq = 1.0 / jnp.power(jnp.float32(base),
                             jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  t = jnp.arange(length, dtype=jnp.float32) if positions is None else positions.astype(
      jnp.float32)
  freqs = t[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B, L, H, Dh) rotated by cos/sin (L, Dh) or (B, L, Dh), in float32; returns x's dtype."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads (and batch)
  return (xf * cos + rot * sin).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x (B, L, H) * (1 + scale) + shift, with shift/scale (B, 1, H)."""
  return x * (1 + scale) + shift


GELU_IMPLS = ("reference", "saved_input")
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def gelu(h: jax.Array, impl: str = "reference") -> jax.Array:
  """GELU, tanh approximation (the reference's), of h (any shape) in h's dtype.

  impl "reference": `jax.nn.gelu(approximate=True)`, differentiated by autodiff, which keeps
  the intermediates of the tanh formula (several arrays the size of h) for the backward pass.
  impl "saved_input": the same forward (bit-identical); a `custom_vjp` keeps only h and computes
  GELU'(h) = 0.5 (1 + t) + 0.5 h (1 - t^2) c (1 + 3 a h^2), t = tanh(c (h + a h^3)), in
  float32 in the backward pass, as torch's GELU does: one array kept instead of several.
  """
  if impl == "reference":
    return jax.nn.gelu(h, approximate=True)
  if impl != "saved_input":
    raise ValueError(f"model.gelu_impl {impl!r}: choose one of {GELU_IMPLS}")
  return _gelu_saved_input(h)


@jax.custom_vjp
def _gelu_saved_input(h):
  return jax.nn.gelu(h, approximate=True)


def _gelu_fwd(h):
  return jax.nn.gelu(h, approximate=True), h


def _gelu_bwd(h, g):
  x = h.astype(jnp.float32)
  t = jnp.tanh(_GELU_C * (x + _GELU_A * x * x * x))
  d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_A * x * x)
  return ((g.astype(jnp.float32) * d).astype(h.dtype),)


_gelu_saved_input.defvjp(_gelu_fwd, _gelu_bwd)


def layer_norm(x: jax.Array, w: jax.Array) -> jax.Array:
  """LayerNorm without bias, eps 1e-5, in float32: x (..., H), weight w (H,) -> (..., H) float32.

  (x - mean) * rsqrt(var + eps) * w in this order. Not nnx.LayerNorm(use_bias=False,
  epsilon=1e-5): that one multiplies rsqrt(var + eps) by the scale before the centred input,
  which differs in the last bit from the reference's order.
  """
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  xc = x - mean
  var = jnp.mean(xc * xc, axis=-1, keepdims=True)
  return xc * jax.lax.rsqrt(var + LN_EPS) * w


class LayerNorm(nnx.Module):
  """`layer_norm` with its weight `scale` (H,) float32, initialised to ones."""

  def __init__(self, dim: int):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.scale[...])


def _hash32(x: jax.Array) -> jax.Array:
  """Chris Wellons' `lowbias32` integer hash, uint32 -> uint32, elementwise."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def dropout_bits(key: jax.Array, shape: tuple[int, ...], impl: str) -> jax.Array:
  """Random uint32 bits of `shape` from a (threefry) `key`, by `impl` (one of DROPOUT_RNGS).

  threefry: `jax.random.bits` of the key itself. rbg: the key's data reused as the seed of
  XLA's RngBitGenerator (one kernel writing the bits; the key is not split or folded as an rbg
  key, so `unsafe_rbg` would draw the same bits). hash: counter-based, two rounds
  of `_hash32` over the element's flat index mixed with the key's two words; pure elementwise
  integer arithmetic that XLA fuses into the consumer (no bits in device memory). Fine for
  dropout masks, not a cryptographic generator.
  """
  if impl == "threefry":
    return jax.random.bits(key, shape, jnp.uint32)
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  data = data.reshape(-1)[:2].astype(jnp.uint32)
  if impl == "rbg":
    seed = jnp.concatenate([data, data ^ jnp.uint32(0x5BD1E995)])
    return jax.random.bits(jax.random.wrap_key_data(seed, impl=impl), shape, jnp.uint32)
  if impl != "hash":
    raise ValueError(f"dropout rng {impl!r}: choose one of {DROPOUT_RNGS}")
  index = jnp.zeros(shape, jnp.uint32)
  for axis in range(len(shape)):
    index = index * jnp.uint32(shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
  return _hash32(_hash32(index * jnp.uint32(0x9E3779B9) + data[0]) ^ data[1])


def dropout(x: jax.Array, rate: float, key: jax.Array, impl: str = "threefry") -> jax.Array:
  """Inverted dropout: x (any shape) kept with probability 1 - rate and scaled by 1/(1 - rate).

  An element is kept when its `dropout_bits` are below round((1 - rate) * 2^32).
  """
  if rate <= 0.0:
    return x
  keep = 1.0 - rate
  threshold = jnp.uint32(min(round(keep * 2.0**32), 2**32 - 1))
  mask = dropout_bits(key, x.shape, impl) < threshold
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def _torch_linear_init(in_features: int):
  """U(-1/sqrt(in), 1/sqrt(in)), torch.nn.Linear's default for weight and bias."""
  bound = 1.0 / math.sqrt(in_features)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def linear(rngs, n_in, n_out, *, bias=True, dtype=jnp.float32, zero=False,
            dot_general=jax.lax.dot_general) -> nnx.Linear:
  """nnx.Linear with float32 params computing in `dtype`; torch's init, or zeros.

  float32 layers use Precision.HIGHEST, so that float32 is not silently TF32 on GPUs.
  `dot_general`: e.g. `fp8.fp8_dot_general`.
  """
  init = nnx.initializers.zeros_init() if zero else _torch_linear_init(n_in)
  precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
  return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                    precision=precision, kernel_init=init, bias_init=init, rngs=rngs,
                    dot_general=dot_general)


def score_head(out: jax.Array, sigma: jax.Array, indices: jax.Array,
               scale_by_sigma: bool) -> jax.Array:
  """The log-score from the output layer's `out` (B, L, D) f32: with `scale_by_sigma` (absorbing
  graphs) minus log(expm1(sigma)) (B,) + log(D - 1); the entry at the input token (B, L) is 0."""
  if scale_by_sigma:
    esigm1 = jnp.where(sigma < 0.5, jnp.expm1(sigma), jnp.exp(sigma) - 1)
    out = out - jnp.log(esigm1)[:, None, None] - math.log(out.shape[-1] - 1)
  at_input = jnp.arange(out.shape[-1], dtype=jnp.int32)[None, None, :] == indices[..., None]
  return jnp.where(at_input, jnp.zeros((), out.dtype), out)


class TimestepEmbedder(nnx.Module):
  """sigma (B,) -> sinusoid (B, 256) -> Linear -> SiLU -> Linear -> (B, C), float32."""

  def __init__(self, cond_dim: int, rngs: nnx.Rngs):
    self.mlp_in = linear(rngs, FREQ_DIM, cond_dim)
    self.mlp_out = linear(rngs, cond_dim, cond_dim)

  def __call__(self, sigma: jax.Array) -> jax.Array:
    return self.mlp_out(jax.nn.silu(self.mlp_in(timestep_embedding(sigma))))
