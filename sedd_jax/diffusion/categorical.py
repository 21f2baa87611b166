"""Categorical draws as in the reference: argmax(p / (1e-10 - log(u + 1e-10))).

With u ~ U[0, 1), -log(u) is Exp(1), so argmax(p / Exp(1)) picks index k with probability
p_k / sum(p) (the exponential race). `probs` need not be normalised, and slightly negative
entries (from the Euler step) simply never win against a positive one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def categorical_from_uniform(probs: Array, u: Array) -> Array:
  """Draws one index per row of `probs` from the uniform noise `u`.

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


def sample_categorical(key: Array, probs: Array) -> Array:
  """Draws one index per row of `probs` (..., D) -> (...) int32, with u ~ U[0, 1) float32."""
  u = jax.random.uniform(key, probs.shape, dtype=jnp.float32)
  return categorical_from_uniform(probs, u)
