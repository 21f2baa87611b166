"""Curricula: ramp factors and time-bias exponents against closed forms, per-sequence sigma
broadcasting, time sampling, configuration, jit with a traced step."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import config_module, rkey
from sedd_jax import diffusion


RAMPS = ["linear", "exponential", "cosine"]
P = [0.0, 0.5, 1.0]

# Closed forms of REFERENCE.md at p = 0, 0.5, 1.
RAMP_FACTORS = {
    "linear": [0.0, 0.5, 1.0],
    "exponential": [0.0, 1 - math.exp(-1.5), 1 - math.exp(-3.0)],
    "cosine": [0.0, 0.5, 1.0],
}
TIME_BIAS = {
    "linear": [1.0, 0.5, 0.0],
    "exponential": [1.0, math.exp(-1.0), math.exp(-2.0)],
    "cosine": [1.0, 0.5, 0.0],
}


@pytest.mark.parametrize("ramp", RAMPS)
def test_ramp_factor_closed_forms(ramp):
  np.testing.assert_allclose(diffusion.ramp_factor(jnp.array(P), ramp), RAMP_FACTORS[ramp],
                             atol=1e-6)
  # Past the preschool the factor stays at its p = 1 value (exponential: min(1, 1 - e^-3p)).
  late = {"linear": 1.0, "exponential": 1 - math.exp(-6.0), "cosine": 1.0}[ramp]
  np.testing.assert_allclose(diffusion.ramp_factor(2.0, ramp), late, atol=1e-6)
  steps = jnp.array(P) * 1000
  np.testing.assert_allclose(diffusion.sigma_scale_factor(steps, ramp, 1000),
                             0.1 + 0.9 * np.array(RAMP_FACTORS[ramp]), atol=1e-6)


@pytest.mark.parametrize("ramp", RAMPS)
def test_time_bias_closed_forms(ramp):
  np.testing.assert_allclose(diffusion.time_bias_exponent(jnp.array(P), ramp), TIME_BIAS[ramp],
                             atol=1e-6)


@pytest.mark.parametrize("ramp", RAMPS)
@pytest.mark.parametrize("p", P)
def test_scaled_sigma_broadcasts_per_sequence(ramp, p):
  """sigma (B,) -> scaled (B,) -> the graph uses it per row of (B, L) tokens (B != L).
  Rows with sigma 0 stay clean; rows with sigma 400 (scaled >= 40: e^-40 is 0 in float32) are
  fully masked; a moderate row's masked fraction is within 5 binomial sd of 1 - e^-scaled."""
  graph = diffusion.Absorbing(10)
  steps, preschool = int(p * 2000), 2000
  sigma = jnp.array([0.0, 400.0, 0.0, 1.0, 400.0])  # B = 5
  scaled = diffusion.scale_sigma(sigma, steps, ramp, preschool)
  c = 0.1 + 0.9 * RAMP_FACTORS[ramp][P.index(p)]
  assert scaled.shape == (5,)
  np.testing.assert_allclose(scaled, np.asarray(sigma) * c, rtol=1e-6)
  x0 = jnp.zeros((5, 4000), jnp.int32)  # L = 4000
  x = np.asarray(graph.sample_transition(rkey(0), x0, scaled))
  assert x.shape == (5, 4000)
  masked = x == graph.dim - 1
  assert not masked[[0, 2]].any() and masked[[1, 4]].all()
  q = 1 - math.exp(-c)
  assert abs(masked[3].mean() - q) < 5 * math.sqrt(q * (1 - q) / 4000)
  with pytest.raises(ValueError, match=r"\(B,\)"):
    diffusion.scale_sigma(jnp.ones((5, 4000)), steps, ramp, preschool)


def test_perturb_with_curriculum_scale():
  """loss.perturb(..., sigma_scale=c) corrupts with c sigma(t) (same key, same draw)."""
  graph, noise = diffusion.Absorbing(10), diffusion.LogLinear()
  cur = diffusion.Curriculum(kind="sigma_scale", ramp="cosine", preschool_time=100)
  corrupt, _ = cur.sigma_scales(50)
  x0 = jnp.zeros((3, 64), jnp.int32)
  t = jnp.array([0.2, 0.5, 0.9])
  key = rkey(4)
  np.testing.assert_array_equal(
      diffusion.perturb(key, graph, noise, x0, t, sigma_scale=corrupt),
      graph.sample_transition(key, x0, noise.total_noise(t) * 0.55))


def test_sample_time_none_and_sigma_scale_are_plain():
  key = rkey(1)
  plain = diffusion.sample_time(key, 64, 1e-3)
  for kind in ("none", "sigma_scale"):
    cfg = ml_collections.ConfigDict(dict(kind=kind, ramp="cosine", preschool_time=100))
    np.testing.assert_array_equal(diffusion.sample_time_curriculum(key, 64, 0, cfg), plain)


@pytest.mark.parametrize("ramp", RAMPS)
def test_time_bias_sampling(ramp):
  key, batch, eps, preschool = rkey(2), 50_000, 1e-3, 1000
  cur = diffusion.Curriculum(kind="time_bias", ramp=ramp, preschool_time=preschool)
  u = np.asarray(jax.random.uniform(key, (batch,), dtype=jnp.float32), np.float64)
  for p in (0.0, 0.5):
    b = TIME_BIAS[ramp][P.index(p)]
    t = np.asarray(cur.sample_time(key, batch, int(p * preschool), eps))
    np.testing.assert_allclose(t, u ** (1 + 2 * b) * (1 - 2 * eps) + eps, rtol=2e-5)
    assert t.min() >= eps and t.max() < 1
    # E[U^k] = 1/(k + 1): t is biased toward low noise.
    mean = (1 - 2 * eps) / (2 + 2 * b) + eps
    assert abs(t.mean() - mean) < 0.01
  for step in (preschool, 5 * preschool):  # plain t from the end of the preschool on
    np.testing.assert_allclose(cur.sample_time(key, batch, step, eps),
                               diffusion.sample_time(key, batch, eps), rtol=1e-6)


def test_traced_step_under_jit():
  cur = diffusion.Curriculum(kind="time_bias", ramp="cosine", preschool_time=100)
  key = rkey(3)
  f = jax.jit(lambda k, s: cur.sample_time(k, 16, s))
  for step in (0, 30, 100, 250):
    np.testing.assert_allclose(f(key, jnp.int32(step)), cur.sample_time(key, 16, step), rtol=1e-6)
  sig = diffusion.Curriculum(kind="sigma_scale", ramp="exponential", preschool_time=100)
  g = jax.jit(sig.sigma_scales)
  for step in (0, 50, 100):
    np.testing.assert_allclose(g(jnp.int32(step)), sig.sigma_scales(step), rtol=1e-6)


def test_sigma_scales_modes():
  c = 0.1 + 0.9 * 0.5  # linear at p = 0.5
  consistent = diffusion.Curriculum(kind="sigma_scale", ramp="linear", preschool_time=10)
  np.testing.assert_allclose(consistent.sigma_scales(5), (c, c), rtol=1e-6)
  fork = diffusion.Curriculum(kind="sigma_scale", ramp="linear", preschool_time=10,
                              sigma_scale_mode="corruption_only")
  np.testing.assert_allclose(fork.sigma_scales(5), (c, 1.0), rtol=1e-6)
  for kind in ("none", "time_bias"):
    np.testing.assert_allclose(diffusion.Curriculum(kind=kind).sigma_scales(5), (1.0, 1.0))
  # preschool_time 0: the curriculum is over from the start.
  np.testing.assert_allclose(
      diffusion.Curriculum(kind="sigma_scale", preschool_time=0).sigma_scales(0), (1.0, 1.0))


def test_config():
  uniref50 = config_module("uniref50")
  assert diffusion.get_curriculum(uniref50.get_config("protlig_stable").curriculum) == (
      diffusion.Curriculum(kind="time_bias", ramp="linear", preschool_time=20_000))
  assert diffusion.get_curriculum(uniref50.get_config("small").curriculum).kind == "none"
  for key, bad in (("kind", "warmup"), ("ramp", "step"), ("preschool_time", -1),
                   ("sigma_scale_mode", "both")):
    cfg = ml_collections.ConfigDict(dict(kind="time_bias", ramp="linear", preschool_time=10))
    cfg[key] = bad
    with pytest.raises(ValueError, match=f"curriculum.{key}"):
      diffusion.get_curriculum(cfg)
