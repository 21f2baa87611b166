"""Noise schedules: parity with the reference, closed forms, config, jit/vmap."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import cases, config_module, noise_from_meta
from sedd_jax import diffusion
from sedd_jax import parity

@pytest.mark.parametrize("path,output", cases("noise"))
def test_noise_parity(path, output):
  fx = parity.load_fixture(path)
  noise = noise_from_meta(fx.meta)
  fn = {"total_noise": noise.total_noise, "rate_noise": noise.rate_noise}[output]
  expected = fx.outputs[output]
  got = np.asarray(fn(fx.inputs["t"]))
  assert got.shape == expected.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=0, atol=parity.tolerance(expected))


def _sigma64(name, params, t):
  """float64 closed forms of REFERENCE.md."""
  if name == "loglinear":
    return -np.log1p(-(1 - params["eps"]) * t)
  if name == "geometric":
    return params["sigma_min"] ** (1 - t) * params["sigma_max"] ** t
  smin, smax = params["sigma_min"], params["sigma_max"]
  return smax + (smin - smax) * (1 + np.cos(np.pi * t)) / 2


SCHEDULES = [
    ("loglinear", dict(eps=1e-3)),
    ("geometric", dict(sigma_min=1e-4, sigma_max=20.0)),
    ("cosine", dict(sigma_min=1e-4, sigma_max=0.5)),
]


@pytest.mark.parametrize("name,params", SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_closed_forms_and_derivative(name, params):
  noise = diffusion.get_noise({"type": name, "eps": 1e-3, "sigma_min": 1.0, "sigma_max": 2.0,
                               **params})
  t = np.linspace(0.01, 0.99, 50)
  sigma, dsigma = noise(jnp.asarray(t, jnp.float32))
  assert sigma.dtype == jnp.float32 and dsigma.dtype == jnp.float32
  np.testing.assert_allclose(sigma, _sigma64(name, params, t), rtol=1e-5, atol=1e-7)
  h = 1e-6
  fd = (_sigma64(name, params, t + h) - _sigma64(name, params, t - h)) / (2 * h)
  np.testing.assert_allclose(dsigma, fd, rtol=1e-4, atol=1e-6)


def test_cosine_endpoints():
  noise = diffusion.Cosine(sigma_min=1e-4, sigma_max=0.5)
  sigma, dsigma = noise(jnp.array([0.0, 0.5, 1.0]))
  np.testing.assert_allclose(sigma, [1e-4, (1e-4 + 0.5) / 2, 0.5], rtol=1e-6)
  np.testing.assert_allclose(dsigma, [0.0, (0.5 - 1e-4) * math.pi / 2, 0.0], atol=1e-6)


def test_elementwise_any_shape():
  t = jnp.full((2, 3, 4), 0.3)
  for noise in (diffusion.LogLinear(), diffusion.Geometric(1e-4, 20.0), diffusion.Cosine()):
    sigma, dsigma = noise(t)
    assert sigma.shape == dsigma.shape == (2, 3, 4)
    assert float(noise.total_noise(0.3)) == pytest.approx(float(sigma[0, 0, 0]))


def test_get_noise_from_config():
  uniref50 = config_module("uniref50")
  assert diffusion.get_noise(uniref50.get_config("small").noise) == diffusion.LogLinear(eps=1e-3)
  assert diffusion.get_noise(uniref50.get_config("protlig_stable").noise) == (
      diffusion.Cosine(1e-4, 0.5))
  cfg = ml_collections.ConfigDict(dict(type="geometric", eps=1e-3, sigma_min=1e-4, sigma_max=20.0))
  assert diffusion.get_noise(cfg) == diffusion.Geometric(1e-4, 20.0)


def test_unknown_noise_type_is_named():
  cfg = ml_collections.ConfigDict(dict(type="linear", eps=1e-3, sigma_min=1e-4, sigma_max=20.0))
  with pytest.raises(ValueError, match="noise.type"):
    diffusion.get_noise(cfg)


@pytest.mark.parametrize("noise", [diffusion.LogLinear(), diffusion.Geometric(1e-4, 20.0),
                                   diffusion.Cosine()], ids=["loglinear", "geometric", "cosine"])
def test_jit_vmap_match_eager(noise):
  t = jnp.linspace(0.0, 0.999, 12, dtype=jnp.float32).reshape(3, 4)
  eager = noise(t)
  jitted = jax.jit(lambda n, t: n(t), static_argnums=0)(noise, t)  # hashable: a static arg
  vmapped = jax.vmap(noise)(t)
  # XLA may fuse/reassociate under jit; near t = 1 dsigma = 1/(1 - (1 - eps) t) has condition
  # number ~1/(1 - t) ~ 1e3, so allow a few float32 ulps times that.
  for a, b, c in zip(eager, jitted, vmapped):
    np.testing.assert_allclose(b, a, rtol=2e-5)
    np.testing.assert_allclose(c, a, rtol=2e-5)
