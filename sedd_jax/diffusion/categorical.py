"""Categorical draws by the exponential race: argmax_k p_k / E_k with E_k iid Exp(1).

Index k wins with probability p_k / sum(p) (equivalently argmax log p_k + G_k with Gumbel
G_k = -log E_k). `probs` need not be normalised, and entries <= 0 (slightly negative ones come
from the Euler step) never win against a positive one. Two ways to draw the E_k:

  "unbiased" (the default)  E = -log1p(-v) from a uniform v with 64 random bits
      (`exponential_from_bits`): exact to float32 rounding down to E ~ 3e-20, so every
      probability ratio p_k / p_max above ~1e-19 is drawn at its rate.
  "reference"  E = 1e-10 - log(u + 1e-10), u = jax.random.uniform float32, the reference's
      argmax(p / (1e-10 - log(u + 1e-10))) (`categorical_from_uniform`; the parity fixtures
      use it). u lies on a grid of 2^-23, so the smallest E is ~1.2e-7 and E is coarse near 0:
      an index with p_k / p_max below ~1e-7 is drawn far less often than p_k / sum(p) (a
      ratio of 1e-8 about 1e4 times less; tests/test_categorical.py computes this exactly).
      This is the float32 truncation that lowers the sampling temperature of masked
      diffusion models (Zheng et al. 2024); it costs one uniform instead of 64 bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

CATEGORICAL_DRAWS = ("unbiased", "reference")


def categorical_from_uniform(probs: Array, u: Array) -> Array:
  """The reference's draw from given uniform noise: argmax(p / (1e-10 - log(u + 1e-10))).

  Args:
    probs: (..., D) non-negative (unnormalised) probabilities.
    u: (..., D) uniform noise in [0, 1), same shape as `probs`.

  Returns:
    (...) int32 indices in [0, D).
  """
  if probs.shape != u.shape:
    raise ValueError(f"probs {probs.shape} and u {u.shape} must have the same shape")
  gumbel_norm = 1e-10 - jnp.log(u + 1e-10)
  return jnp.argmax(probs / gumbel_norm, axis=-1).astype(jnp.int32)


def _fixed_point(hi: Array, lo: Array) -> Array:
  """(hi * 2^32 + lo + 1/2) / 2^64 in float32 (relative error 2^-24): values in (0, 1)."""
  return hi.astype(jnp.float32) * 2.0 ** -32 + (lo.astype(jnp.float32) + 0.5) * 2.0 ** -64


def exponential_from_bits(bits: Array) -> Array:
  """Exp(1) noise from 64 random bits: (..., 2) uint32 (high word, low word) -> (...) float32.

  With n = hi * 2^32 + lo and v = (n + 1/2) / 2^64 uniform in (0, 1), returns -log(1 - v):
  -log1p(-v) for v < 1/2 (v carries its 64-bit resolution near 0, so E is exact to float32
  rounding down to 2^-65) and -log(1 - v) with 1 - v computed from the complemented bits
  otherwise (so E reaches ~44.4 instead of float32's ~16.6).
  """
  if bits.dtype != jnp.uint32 or bits.shape[-1:] != (2,):
    raise ValueError(f"bits must be uint32 of shape (..., 2); got {bits.dtype} {bits.shape}")
  hi, lo = bits[..., 0], bits[..., 1]
  low_half = hi < jnp.uint32(2 ** 31)
  return jnp.where(low_half, -jnp.log1p(-_fixed_point(hi, lo)),
                   -jnp.log(_fixed_point(~hi, ~lo)))


def categorical_from_exponential(probs: Array, e: Array) -> Array:
  """argmax_k log p_k - log E_k (the exponential race in log space): (..., D) -> (...) int32.

  Entries of `probs` <= 0 get -inf (never drawn unless the whole row is <= 0, then index 0).
  """
  if probs.shape != e.shape:
    raise ValueError(f"probs {probs.shape} and e {e.shape} must have the same shape")
  logp = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, jnp.finfo(probs.dtype).tiny)), -jnp.inf)
  return jnp.argmax(logp - jnp.log(e), axis=-1).astype(jnp.int32)


def sample_categorical(key: Array, probs: Array, draw: str = "unbiased") -> Array:
  """Draws one index per row of `probs` (..., D) -> (...) int32.

  `draw`: "unbiased" (64-bit exponential noise, the default) or "reference" (the reference's
  float32 draw, u = jax.random.uniform(key, probs.shape)); see the module docstring.
  """
  if draw == "reference":
    u = jax.random.uniform(key, probs.shape, dtype=jnp.float32)
    return categorical_from_uniform(probs, u)
  if draw != "unbiased":
    raise ValueError(f"draw {draw!r} is not one of {CATEGORICAL_DRAWS}")
  bits = jax.random.bits(key, (*probs.shape, 2), dtype=jnp.uint32)
  return categorical_from_exponential(probs, exponential_from_bits(bits))
