"""Categorical draws: closed-form cases, draw frequencies (chi-square), shapes, jit, and the
probability of a rare event under the reference float32 draw (biased) and the default one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from helpers import rkey
from sedd_jax import diffusion


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


@pytest.mark.parametrize("draw", diffusion.CATEGORICAL_DRAWS)
def test_frequencies_match_normalised_probs(draw):
  """Chi-square goodness of fit of 200,000 draws (fixed seed) against p / sum(p); the test
  fails if the p-value is below 1e-3. Unnormalised p with a zero and a slightly negative entry,
  which must never be drawn."""
  p = np.array([0.3, 0.0, 1.2, 0.6, -1e-4, 0.9, 0.15], np.float32)
  n = 200_000
  draws = np.asarray(diffusion.sample_categorical(
      rkey(42), jnp.broadcast_to(jnp.asarray(p), (n, len(p))), draw))
  counts = np.bincount(draws, minlength=len(p))
  assert counts[1] == 0 and counts[4] == 0
  support = p > 0
  expected = n * p[support] / p[support].sum()
  _, pvalue = scipy.stats.chisquare(counts[support], expected)
  assert pvalue > 1e-3, (counts, expected, pvalue)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="same shape"):
    diffusion.categorical_from_uniform(jnp.ones((2, 3)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="same shape"):
    diffusion.categorical_from_exponential(jnp.ones((2, 3)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="draw"):
    diffusion.sample_categorical(rkey(0), jnp.ones((2, 3)), "gumbel32")
  with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
    diffusion.exponential_from_bits(jnp.zeros((4, 3), jnp.uint32))


def test_batched_shapes_and_jit_match_eager():
  key = rkey(3)
  probs = jax.random.uniform(rkey(4), (3, 5, 7))
  eager = diffusion.sample_categorical(key, probs)
  assert eager.shape == (3, 5) and eager.dtype == jnp.int32
  np.testing.assert_array_equal(jax.jit(diffusion.sample_categorical)(key, probs), eager)
  u = jax.random.uniform(key, probs.shape, dtype=jnp.float32)
  ref = diffusion.sample_categorical(key, probs, "reference")
  np.testing.assert_array_equal(diffusion.categorical_from_uniform(probs, u), ref)
  vmapped = jax.vmap(diffusion.categorical_from_uniform)(probs, u)
  np.testing.assert_array_equal(vmapped, ref)
  bits = jax.random.bits(key, (*probs.shape, 2), dtype=jnp.uint32)
  e = diffusion.exponential_from_bits(bits)
  np.testing.assert_array_equal(diffusion.categorical_from_exponential(probs, e), eager)


def test_exponential_from_bits_is_the_exact_inverse_cdf():
  """E(n) = -log(1 - (n + 1/2) / 2^64) for n = hi * 2^32 + lo, checked against float64 from the
  smallest n (E ~ 2.7e-20) to the largest (E ~ 44.4), through both branches."""
  words = [(0, 0), (0, 1), (0, 12345), (1, 0), (1000, 2 ** 31), (2 ** 20, 7),
           (2 ** 31 - 1, 2 ** 32 - 1), (2 ** 31, 0), (3 * 2 ** 30, 99), (2 ** 32 - 2 ** 10, 5),
           (2 ** 32 - 1, 2 ** 32 - 1)]
  bits = jnp.asarray(np.array(words, np.uint32))
  got = np.asarray(diffusion.exponential_from_bits(bits), np.float64)
  n = np.array([h * 2 ** 32 + l for h, l in words], dtype=object)
  tail = np.array([float((2 ** 64 - k - 0.5) / 2 ** 64) for k in n])  # 1 - v, exact enough
  v = np.array([float((k + 0.5) / 2 ** 64) for k in n])
  want = np.where(v < 0.5, -np.log1p(-np.minimum(v, 0.5)), -np.log(tail))
  np.testing.assert_allclose(got, want, rtol=3e-7)
  assert got[0] < 3e-20 and got[-1] > 44


R = 1e-8  # probs [1, R]: the rare index should be drawn with probability R / (1 + R)


def test_reference_draw_misses_rare_events_exactly():
  """P(rare) of the reference draw, computed exactly over its float32 uniform grid u = k 2^-23.
  The rare index can only win when its E = -log u ~ j 2^-23 is tiny and the top's E exceeds
  j 2^-23 / R ~ 11.9 j (u_top < 2^-17): for j = 1..8 (beyond, P < e^-95) every u_top of
  the grid below 2^-7 is counted through `categorical_from_uniform` itself (above 2^-7,
  E_top < 4.9 and the rare index cannot win). The result is ~1e4 times below R."""
  m = 2 ** 16  # u_top = k 2^-23 for k < 2^16: u_top < 2^-7
  u_top = jnp.arange(m, dtype=jnp.float32) * 2.0 ** -23
  u_rare = 1.0 - jnp.arange(1, 9, dtype=jnp.float32)[:, None] * 2.0 ** -23  # (8, 1)
  u = jnp.stack(jnp.broadcast_arrays(u_top[None, :], u_rare), axis=-1)  # (8, m, 2)
  wins = diffusion.categorical_from_uniform(jnp.broadcast_to(jnp.array([1.0, R]), u.shape), u)
  assert not wins[:, m // 2:].any()  # no win for the larger u_top: the cut-off is safe
  total = float(jnp.sum(wins)) * 2.0 ** -46  # sum of P(u_rare) * P(u_top), 2^-23 each
  assert 0 < total < R * 1e-3, total
  # A rare event of 1e-2 is drawn at its rate (the enumeration itself is right): every u_rare
  # against E_top = log 2, P(rare | E_top) = 1 - 2^-0.01.
  grid = jnp.arange(2 ** 23, dtype=jnp.float32) * 2.0 ** -23
  u = jnp.stack([jnp.full_like(grid, 0.5), grid], axis=-1)
  wins = diffusion.categorical_from_uniform(jnp.broadcast_to(jnp.array([1.0, 1e-2]), u.shape), u)
  np.testing.assert_allclose(float(jnp.mean(wins)), -np.expm1(-1e-2 * np.log(2)), rtol=1e-3)


def test_unbiased_draw_keeps_rare_events():
  """P(rare) of the default draw for probs [1, R] by importance sampling of the rare index's
  64-bit noise: it can only win when E_rare < R E_top, so n is drawn uniformly from
  [0, H 2^32) (E_rare < ~40 R, P = H 2^-32; outside, a win needs E_top > 40, P < 5e-18) and
  the top's bits fully at random. P(rare) = H 2^-32 * mean(win) must be R within 5%
  (the Monte-Carlo error of 2^18 draws is 1.2%)."""
  n = 2 ** 18
  h = int(np.ceil(40 * R * 2 ** 32))
  k1, k2, k3 = jax.random.split(rkey(7), 3)
  top = jax.random.bits(k1, (n, 2), dtype=jnp.uint32)
  rare = jnp.stack([jax.random.randint(k2, (n,), 0, h).astype(jnp.uint32),
                    jax.random.bits(k3, (n,), dtype=jnp.uint32)], axis=-1)
  e = diffusion.exponential_from_bits(jnp.stack([top, rare], axis=1))  # (n, 2)
  probs = jnp.broadcast_to(jnp.array([1.0, R], jnp.float32), (n, 2))
  wins = diffusion.categorical_from_exponential(probs, e)
  p_rare = h * 2.0 ** -32 * float(jnp.mean(wins))
  np.testing.assert_allclose(p_rare, R / (1 + R), rtol=0.05)
