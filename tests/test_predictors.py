"""Predictor steps: parity of probabilities and sampled tokens with the reference, properties,
projection, shapes, jit/vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import cases, graph_from_meta, noise_from_meta, rkey
from sedd_jax import diffusion
from sedd_jax import parity


PROBS = {"euler": diffusion.euler_probs, "analytic": diffusion.analytic_probs,
         "denoise": diffusion.denoise_probs}
STEPS = {"euler": diffusion.euler_step, "analytic": diffusion.analytic_step,
         "denoise": diffusion.denoise_step}


@pytest.mark.parametrize("path,output", cases("sampling"))
def test_sampling_parity(path, output):
  fx = parity.load_fixture(path)
  graph = graph_from_meta(fx.meta)
  noise = noise_from_meta(fx.meta)
  inp = fx.inputs
  kind, what = output.split("/")
  t = inp[f"{kind}/t"] if f"{kind}/t" in inp else inp["t"]
  probs = PROBS[kind](graph, noise, inp["score"], inp["x"].astype(np.int32), t, inp["step_size"])
  expected = fx.outputs[output]
  if what == "probs":
    assert probs.shape == expected.shape
    np.testing.assert_allclose(probs, expected, rtol=0, atol=parity.tolerance(expected))
  else:
    got = diffusion.categorical_from_uniform(probs, inp[f"{kind}/u"])
    np.testing.assert_array_equal(got, expected)  # sampled tokens match exactly


GRAPHS = [diffusion.Absorbing(6), diffusion.Uniform(6)]
GRAPH_IDS = ["absorb", "uniform"]


def _inputs(graph, seed=0, b=3, l=9):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, graph.dim, (b, l)).astype(np.int32)
  score = rng.uniform(0.05, 2.0, (b, l, graph.dim)).astype(np.float32)
  t = rng.uniform(0.2, 0.9, (b,)).astype(np.float32)
  return x, score, t


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
@pytest.mark.parametrize("kind", ["euler", "analytic", "denoise"])
def test_step_is_a_categorical_draw_of_its_probs(graph, kind):
  noise = diffusion.LogLinear()
  x, score, t = _inputs(graph)
  key = rkey(11)
  new = STEPS[kind](key, graph, noise, score, x, t, 0.05)
  probs = PROBS[kind](graph, noise, score, x, t, 0.05)
  assert new.shape == x.shape and new.dtype == jnp.int32
  np.testing.assert_array_equal(new, diffusion.sample_categorical(key, probs))
  # The reference draw, with u = jax.random.uniform(key, probs.shape) (how the sampling
  # fixtures' u are used).
  ref = STEPS[kind](key, graph, noise, score, x, t, 0.05, draw="reference")
  u = jax.random.uniform(key, probs.shape, dtype=jnp.float32)
  np.testing.assert_array_equal(ref, diffusion.categorical_from_uniform(probs, u))


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
def test_euler_probs_rows_sum_to_one(graph):
  x, score, t = _inputs(graph)
  probs = diffusion.euler_probs(graph, diffusion.LogLinear(), score, x, t, 0.01)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)


def test_absorbing_keeps_unmasked_tokens_and_denoise_removes_masks():
  graph, noise = diffusion.Absorbing(6), diffusion.LogLinear()
  x, score, t = _inputs(graph)
  unmasked = x != 6
  for kind in ("euler", "analytic", "denoise"):
    new = np.asarray(STEPS[kind](rkey(5), graph, noise, score, x, t, 0.05))
    np.testing.assert_array_equal(new[unmasked], x[unmasked])
  denoised = np.asarray(diffusion.denoise_step(rkey(6), graph, noise, score, x,
                                               jnp.full((3,), 1e-5)))
  assert denoised.max() < 6  # the mask is never drawn
  assert diffusion.denoise_probs(graph, noise, score, x, t).shape == (3, 9, 6)


def test_project():
  x = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)
  fixed = jnp.full((3, 4), 99, jnp.int32)
  mask = jnp.array([[True, False, False, True]] * 3)
  out = diffusion.project(x, fixed, mask)
  np.testing.assert_array_equal(out, np.where(np.asarray(mask), 99, np.asarray(x)))
  assert out.dtype == jnp.int32
  # (L,) mask and tokens broadcast over the batch.
  np.testing.assert_array_equal(diffusion.project(x, fixed[0], mask[0]), out)
  with pytest.raises(ValueError, match="fixed_mask"):
    diffusion.project(x, fixed, jnp.ones((3, 5), bool))


def test_shape_errors():
  graph, noise = diffusion.Absorbing(6), diffusion.LogLinear()
  x, score, t = _inputs(graph)
  with pytest.raises(ValueError, match="t must"):
    diffusion.analytic_probs(graph, noise, score, x, jnp.ones((3, 9)) * 0.5, 0.01)
  with pytest.raises(ValueError, match="score"):
    diffusion.euler_probs(graph, noise, score[..., :-1], x, t, 0.01)


def test_predictor_registry():
  assert set(diffusion.PREDICTORS) == {"euler", "analytic"}


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
def test_jit_vmap_match_eager(graph):
  noise = diffusion.LogLinear()
  n = 2
  batches = [_inputs(graph, seed=k) for k in range(n)]
  key = rkey(9)

  def f(g, nz, score, x, t):
    out = {}
    for kind in ("euler", "analytic", "denoise"):
      out[kind] = PROBS[kind](g, nz, score, x, t, 0.05)
      out[kind + "_x"] = STEPS[kind](key, g, nz, score, x, t, 0.05)
    return out

  eager = [f(graph, noise, s, x, t) for x, s, t in batches]
  jit_f = jax.jit(f, static_argnums=(0, 1))
  jitted = [jit_f(graph, noise, s, x, t) for x, s, t in batches]
  stacked = [np.stack(a) for a in zip(*batches)]
  vmapped = jax.jit(jax.vmap(lambda x, s, t: f(graph, noise, s, x, t)))(*stacked)
  for name in eager[0]:
    for k in range(n):
      check = (np.testing.assert_array_equal if name.endswith("_x") else
               lambda a, b, **kw: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, **kw))
      check(jitted[k][name], eager[k][name], err_msg=f"jit {name}")
      check(vmapped[name][k], eager[k][name], err_msg=f"vmap {name}")
