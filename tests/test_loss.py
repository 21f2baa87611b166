"""Score-entropy loss: parity with the reference, closed forms, weights, shapes, jit/vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import cases, graph_from_meta, noise_from_meta, rkey
from sedd_jax import diffusion
from sedd_jax import parity


@pytest.mark.parametrize("path,output", cases("loss"))
def test_loss_parity(path, output):
  fx = parity.load_fixture(path)
  graph = graph_from_meta(fx.meta)
  noise = noise_from_meta(fx.meta)
  inp = fx.inputs
  got = np.asarray(diffusion.score_entropy_loss(
      graph, noise, inp["log_score"], inp["x"].astype(np.int32), inp["x0"].astype(np.int32),
      inp["t"]))
  expected = fx.outputs[output]
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=0, atol=parity.tolerance(expected))


def test_sample_time():
  eps = 1e-3
  t = np.asarray(diffusion.sample_time(rkey(0), 100_000, eps))
  assert t.shape == (100_000,) and t.dtype == np.float32
  assert t.min() >= eps and t.max() < 1.0
  # mean of U[eps, 1) is (1 + eps)/2; sd of the mean = (1 - eps)/sqrt(12 n); 5 sd.
  assert abs(t.mean() - (1 + eps) / 2) < 5 * (1 - eps) / np.sqrt(12 * 100_000)


def test_perturb_absorbing_mask_fraction():
  """Per row, masked fraction ~ Binomial(L, 1 - e^-sigma(t)) / L; 5 standard deviations."""
  graph, noise = diffusion.Absorbing(20), diffusion.LogLinear(1e-3)
  t = jnp.array([0.1, 0.5, 0.9])
  x0 = jnp.zeros((3, 20_000), jnp.int32)
  x = np.asarray(diffusion.perturb(rkey(1), graph, noise, x0, t))
  q = 1 - np.exp(-np.asarray(noise.total_noise(t), np.float64))  # = (1 - eps) t for loglinear
  np.testing.assert_allclose(q, (1 - 1e-3) * np.asarray(t), rtol=1e-5)
  frac = (x == graph.dim - 1).mean(axis=1)
  np.testing.assert_array_less(np.abs(frac - q), 5 * np.sqrt(q * (1 - q) / x.shape[1]))


def test_absorbing_loglinear_weight_is_one_over_t():
  """REFERENCE.md: for absorb + loglinear, dsigma/E = 1/t, so d loss / d s_{x0} = -1/t at
  each masked position (and 0 elsewhere)."""
  graph, noise = diffusion.Absorbing(6), diffusion.LogLinear(1e-3)
  t = jnp.array([0.2, 0.7])
  x0 = jnp.array([[1, 2, 3], [4, 5, 0]], jnp.int32)
  x = jnp.array([[6, 2, 6], [6, 6, 0]], jnp.int32)
  log_score = jnp.zeros((2, 3, 7))
  grad = jax.grad(lambda s: diffusion.score_entropy_loss(graph, noise, s, x, x0, t).sum())(
      log_score)
  g_x0 = np.take_along_axis(np.asarray(grad), np.asarray(x0)[..., None], -1)[..., 0]
  masked = np.asarray(x) == 6
  # d/ds_{x0} [e^{s_{x0}} - s_{x0}/E] = 1 - 1/E at s = 0, times dsigma: dsigma - 1/t.
  dsigma = np.asarray(noise.rate_noise(t))[:, None]
  expected = np.where(masked, dsigma - 1 / np.asarray(t)[:, None], 0.0)
  np.testing.assert_allclose(g_x0, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("graph", [diffusion.Absorbing(6), diffusion.Uniform(6)],
                         ids=["absorb", "uniform"])
def test_weight_masks_positions(graph):
  rng = np.random.default_rng(0)
  noise = diffusion.Geometric(1e-4, 20.0)
  b, l = 3, 8
  x0 = rng.integers(0, 6, (b, l)).astype(np.int32)
  x = rng.integers(0, graph.dim, (b, l)).astype(np.int32)
  log_score = rng.normal(size=(b, l, graph.dim)).astype(np.float32)
  t = jnp.array([0.2, 0.5, 0.8])
  # Position weights 1 on the first half: the loss of the first half alone.
  lengths = np.array([l // 2] * b)
  weight = (np.arange(l)[None] < lengths[:, None]).astype(np.float32)
  half = diffusion.score_entropy_loss(graph, noise, log_score[:, :l // 2], x[:, :l // 2],
                                      x0[:, :l // 2], t)
  got = diffusion.score_entropy_loss(graph, noise, log_score, x, x0, t, weight)
  np.testing.assert_allclose(got, half, rtol=1e-5)
  # Padding positions that are non-finite still count for nothing.
  bad = log_score.copy()
  bad[:, l // 2:] = np.inf
  np.testing.assert_allclose(diffusion.score_entropy_loss(graph, noise, bad, x, x0, t, weight),
                             half, rtol=1e-5)
  np.testing.assert_allclose(
      diffusion.score_entropy_loss(graph, noise, log_score, x, x0, t, np.zeros((b, l))), 0.0)
  with pytest.raises(ValueError, match="weight"):
    diffusion.score_entropy_loss(graph, noise, log_score, x, x0, t, np.ones((b, l + 1)))


def test_sigma_scale_is_a_rescaled_schedule():
  """The consistent sigma_scale c turns geometric(smin, smax) into geometric(c smin, c smax)."""
  rng = np.random.default_rng(1)
  graph, c = diffusion.Absorbing(6), 0.37
  x0 = rng.integers(0, 6, (4, 10)).astype(np.int32)
  x = np.where(rng.random((4, 10)) < 0.5, 6, x0).astype(np.int32)
  log_score = rng.normal(size=(4, 10, 7)).astype(np.float32)
  t = jnp.array([0.1, 0.4, 0.6, 0.95])
  scaled = diffusion.score_entropy_loss(graph, diffusion.Geometric(1e-3, 5.0), log_score, x, x0,
                                        t, sigma_scale=c)
  direct = diffusion.score_entropy_loss(graph, diffusion.Geometric(c * 1e-3, c * 5.0), log_score,
                                        x, x0, t)
  np.testing.assert_allclose(scaled, direct, rtol=1e-5)
  with pytest.raises(ValueError, match="sigma_scale"):
    diffusion.score_entropy_loss(graph, diffusion.LogLinear(), log_score, x, x0, t,
                                 sigma_scale=jnp.ones(3))


def test_shape_errors():
  graph, noise = diffusion.Absorbing(6), diffusion.LogLinear()
  x = jnp.zeros((2, 5), jnp.int32)
  log_score = jnp.zeros((2, 5, 7))
  with pytest.raises(ValueError, match=r"\(B,\)"):
    diffusion.score_entropy_loss(graph, noise, log_score, x, x, jnp.ones((2, 5)) * 0.5)
  with pytest.raises(ValueError, match=r"\(B,\)"):
    diffusion.perturb(rkey(0), graph, noise, x, jnp.ones(3) * 0.5)


@pytest.mark.parametrize("graph", [diffusion.Absorbing(6), diffusion.Uniform(6)],
                         ids=["absorb", "uniform"])
def test_jit_vmap_match_eager(graph):
  rng = np.random.default_rng(2)
  noise = diffusion.LogLinear(1e-3)
  n, b, l = 2, 3, 5
  x0 = rng.integers(0, 6, (n, b, l)).astype(np.int32)
  x = rng.integers(0, graph.dim, (n, b, l)).astype(np.int32)
  log_score = rng.normal(size=(n, b, l, graph.dim)).astype(np.float32)
  t = rng.uniform(0.01, 0.99, (n, b)).astype(np.float32)
  weight = (rng.random((n, b, l)) < 0.7).astype(np.float32)

  def f(g, nz, ls, x, x0, t, w):
    return (diffusion.score_entropy_loss(g, nz, ls, x, x0, t, w),
            diffusion.perturb(rkey(3), g, nz, x0, t))

  eager = [f(graph, noise, log_score[k], x[k], x0[k], t[k], weight[k]) for k in range(n)]
  jit_f = jax.jit(f, static_argnums=(0, 1))  # graph and noise are hashable static arguments
  jitted = [jit_f(graph, noise, log_score[k], x[k], x0[k], t[k], weight[k]) for k in range(n)]
  vmapped = jax.jit(jax.vmap(lambda *a: f(graph, noise, *a)))(log_score, x, x0, t, weight)
  for k in range(n):
    np.testing.assert_allclose(jitted[k][0], eager[k][0], rtol=1e-5)
    np.testing.assert_allclose(vmapped[0][k], eager[k][0], rtol=1e-5)
    np.testing.assert_array_equal(jitted[k][1], eager[k][1])
    np.testing.assert_array_equal(vmapped[1][k], eager[k][1])
