"""Categorical draws: closed-form cases, draw frequencies (chi-square), shapes, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from sedd_jax import diffusion


def rkey(seed):
  """A PRNG key. The functions under test work with any key implementation; `rbg` keys compile
  their draws ~10x faster than threefry on the CPU, which keeps these tests quick."""
  return jax.random.key(seed, impl="rbg")


def test_closed_form_example():
  # probs [1, 1]; u = [0.5, 0.9] -> -log u = [0.693, 0.105] -> p / that = [1.44, 9.49] -> 1.
  assert int(diffusion.categorical_from_uniform(jnp.array([1.0, 1.0]), jnp.array([0.5, 0.9]))) == 1
  # u = [0.9, 0.5] -> index 0.
  assert int(diffusion.categorical_from_uniform(jnp.array([1.0, 1.0]), jnp.array([0.9, 0.5]))) == 0
  # u = 0 gives the largest denominator (-log 1e-10 ~ 23): that index loses to any u near 1.
  probs = jnp.array([1.0, 1e-3])
  assert int(diffusion.categorical_from_uniform(probs, jnp.array([0.0, 0.999]))) == 1


def test_one_hot_always_wins_and_negative_never_does():
  u = jax.random.uniform(rkey(0), (1000, 4))
  probs = jnp.broadcast_to(jnp.array([0.0, -1e-3, 2.0, 0.0]), (1000, 4))
  out = diffusion.categorical_from_uniform(probs, u)
  assert out.dtype == jnp.int32 and out.shape == (1000,)
  np.testing.assert_array_equal(out, 2)


def test_frequencies_match_normalised_probs():
  """Chi-square goodness of fit of 200,000 draws (fixed seed) against p / sum(p); the test
  fails if the p-value is below 1e-3. Unnormalised p with a zero and a slightly negative entry,
  which must never be drawn."""
  p = np.array([0.3, 0.0, 1.2, 0.6, -1e-4, 0.9, 0.15], np.float32)
  n = 200_000
  draws = np.asarray(diffusion.sample_categorical(rkey(42),
                                                  jnp.broadcast_to(jnp.asarray(p), (n, len(p)))))
  counts = np.bincount(draws, minlength=len(p))
  assert counts[1] == 0 and counts[4] == 0
  support = p > 0
  expected = n * p[support] / p[support].sum()
  _, pvalue = scipy.stats.chisquare(counts[support], expected)
  assert pvalue > 1e-3, (counts, expected, pvalue)


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match="same shape"):
    diffusion.categorical_from_uniform(jnp.ones((2, 3)), jnp.ones((2, 4)))


def test_batched_shapes_and_jit_match_eager():
  key = rkey(3)
  probs = jax.random.uniform(rkey(4), (3, 5, 7))
  eager = diffusion.sample_categorical(key, probs)
  assert eager.shape == (3, 5) and eager.dtype == jnp.int32
  np.testing.assert_array_equal(jax.jit(diffusion.sample_categorical)(key, probs), eager)
  u = jax.random.uniform(key, probs.shape, dtype=jnp.float32)
  np.testing.assert_array_equal(diffusion.categorical_from_uniform(probs, u), eager)
  vmapped = jax.vmap(diffusion.categorical_from_uniform)(probs, u)
  np.testing.assert_array_equal(vmapped, eager)
