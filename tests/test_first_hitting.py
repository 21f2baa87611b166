"""The first-hitting sampler: the reveal clock (closed-form law of the reveal times), the
position and token of one reveal, and the remask-and-redraw corrector."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from helpers import TOY_GRAPH as GRAPH, TOY_L as L, TOY_NOISE as NOISE
from helpers import run_sampler
from sedd_jax import diffusion
from sedd_jax.sampling import first_hitting


def test_next_reveal_is_the_latest_of_n_uniform_times():
  """m(tau) / m(t) = u^(1/n): the largest of n U(0, 1) draws, whose CDF is x^n."""
  n_draws = 20000
  log_m = jnp.full((n_draws,), np.log(0.8), jnp.float32)
  for n in (1, 4):
    new = first_hitting.next_reveal_log_m(jax.random.key(n), log_m, jnp.full((n_draws,), n))
    ratio = np.exp(np.asarray(new) - np.log(0.8))
    assert (ratio > 0).all() and (ratio <= 1).all()
    assert stats.kstest(ratio, lambda x, n=n: np.clip(x, 0, 1) ** n).pvalue > 1e-3
  # n = 0 (nothing masked) is read as 1: no division by zero.
  assert np.isfinite(np.asarray(first_hitting.next_reveal_log_m(
      jax.random.key(0), log_m[:2], jnp.zeros((2,), jnp.int32)))).all()


def test_reveal_position_is_uniform_among_masked_and_token_follows_the_score():
  n = 6000
  masked = jnp.broadcast_to(jnp.array([True, False, True, True]), (n, 4))
  # Non-mask columns 0..2 in ratio 1 : 2 : 5 at every position; the mask column is ignored.
  score = jnp.broadcast_to(jnp.array([1.0, 2.0, 5.0, 100.0]), (n, 4, 4))
  pos, tok = first_hitting.first_hitting_reveal(jax.random.key(3), score, masked, "unbiased")
  pos, tok = np.asarray(pos), np.asarray(tok)
  assert not (pos == 1).any() and tok.max() <= 2
  assert stats.chisquare(np.bincount(pos, minlength=4)[[0, 2, 3]]).pvalue > 1e-4
  assert stats.chisquare(np.bincount(tok, minlength=3), n * np.array([1, 2, 5]) / 8).pvalue > 1e-4


def test_corrector_redraws_one_generated_token_with_probability_eta():
  graph = diffusion.Absorbing(3)
  x = jnp.array([[0, 1, 0, 0], [2, 2, 1, 1]], jnp.int32)
  generated = jnp.array([[False, True, True, True], [False, False, False, True]])
  sigma = jnp.ones((2,))

  def score_at(x, sigma):  # all mass on token 2 (the mask column last)
    return jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0, 1.0]), (*x.shape, 4))

  same, nfe = first_hitting.remask_and_redraw(jax.random.key(0), score_at, graph, x, generated,
                                              sigma, 0.0, "unbiased", jnp.int32(5))
  np.testing.assert_array_equal(same, x)
  assert int(nfe) == 5  # eta = 0: no model call
  out, nfe = first_hitting.remask_and_redraw(jax.random.key(0), score_at, graph, x, generated,
                                             sigma, 1.0, "unbiased", jnp.int32(5))
  out = np.asarray(out)
  assert int(nfe) == 6
  changed = out != np.asarray(x)
  assert changed.sum(axis=1).tolist() == [1, 1]  # one redraw per row, to token 2
  assert (out[changed] == 2).all() and not (changed & ~np.asarray(generated)).any()
  only, nfe = first_hitting.remask_and_redraw(jax.random.key(0), score_at, graph, x, generated,
                                              sigma, 1.0, "unbiased", jnp.int32(5),
                                              jnp.array([False, True]))
  np.testing.assert_array_equal(np.asarray(only)[0], np.asarray(x)[0])  # an inactive row stays
  np.testing.assert_array_equal(np.asarray(only)[1], out[1])


def test_first_hitting_clock():
  """Reveal times: each position's m(tau) = 1 - e^{-sigma(tau)} is U(0, m(1)), independently.
  A score that emits token 1 when sigma < s0 (else 0) then gives iid positions with
  P(1) = (1 - e^{-s0}) / m(1): chi-square over the 8 cells of L = 3. Also one model call per
  position (L calls), and fixed positions are never revealed (fewer calls)."""
  s0 = 0.4

  def clock_fn(x, sigma):
    hot = jnp.where((sigma < s0)[:, None, None], jax.nn.one_hot(1, GRAPH.dim),
                    jax.nn.one_hot(0, GRAPH.dim))
    return jnp.broadcast_to(hot, (*x.shape, GRAPH.dim))

  n = 8000
  x, nfe = run_sampler(clock_fn, (n, L), seed=21, steps=1, predictor="first_hitting",
                       return_nfe=True)
  assert int(nfe) == L and set(np.unique(x)) <= {0, 1}
  m1 = -np.expm1(-float(NOISE.total_noise(jnp.float32(1.0))))
  q = -np.expm1(-s0) / m1
  codes = (x * np.array([4, 2, 1])).sum(-1)
  ones = np.array([bin(c).count("1") for c in range(8)])
  expected = n * q ** ones * (1 - q) ** (L - ones)
  p = stats.chisquare(np.bincount(codes, minlength=8), expected).pvalue
  assert p > 1e-4, (p, np.bincount(codes, minlength=8), expected)
  fixed = np.array([2, 0, 0], np.int32)
  y, nfe = run_sampler(clock_fn, (4, L), seed=2, steps=1, predictor="first_hitting",
                       return_nfe=True, fixed_tokens=fixed, fixed_mask=fixed > 0)
  assert int(nfe) == L - 1 and (y[:, 0] == 2).all()
  # Remasking with eta = 1: a corrector call after every reveal, never on the fixed position.
  y, nfe = run_sampler(clock_fn, (4, L), seed=2, steps=1, predictor="first_hitting",
                       return_nfe=True, fixed_tokens=fixed, fixed_mask=fixed > 0, remask=1.0)
  assert int(nfe) == 2 * (L - 1) and (y[:, 0] == 2).all()
