"""Graphs: parity with the reference, brute force against the rate matrix Q (float64 expm),
score-entropy properties, sampling statistics, shape checks, jit/vmap."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.linalg

from helpers import cases, graph_from_meta, rkey
from sedd_jax import diffusion
from sedd_jax import parity


TOKENS = 5  # tiny vocabulary for the brute-force tests


def _ints(a):
  return np.asarray(a).astype(np.int32)


@pytest.mark.parametrize("path,output", cases("graph"))
def test_graph_parity(path, output):
  fx = parity.load_fixture(path)
  graph = graph_from_meta(fx.meta)
  inp = fx.inputs
  i, x, x0 = _ints(inp["i"]), _ints(inp["x"]), _ints(inp["x0"])
  score = np.exp(inp["log_score"])
  fns = {
      "rate": lambda: graph.rate(i),
      "transp_rate": lambda: graph.transp_rate(i),
      "transition": lambda: graph.transition(i, inp["sigma"]),
      "transp_transition": lambda: graph.transp_transition(i, inp["sigma"]),
      "staggered_score": lambda: graph.staggered_score(score, inp["dsigma"]),
      "reverse_rate": lambda: graph.reverse_rate(i, score),
      "score_entropy": lambda: graph.score_entropy(inp["log_score"], inp["sigma"], x, x0),
  }
  expected = fx.outputs[output]
  got = np.asarray(fns[output]())
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=0, atol=parity.tolerance(expected))


# ---- brute force against the rate matrix ----------------------------------------------------

def q_matrix(graph):
  """Q[y, x] = rate of x -> y (columns sum to 0), from the graph definitions in REFERENCE.md."""
  d = graph.dim
  if graph.absorb:
    q = -np.eye(d)
    q[d - 1, :] += 1.0  # every state jumps to the mask at rate 1; the mask stays
    return q
  return np.full((d, d), 1.0 / d) - np.eye(d)


GRAPHS = [diffusion.Absorbing(TOKENS), diffusion.Uniform(TOKENS)]
GRAPH_IDS = ["absorb", "uniform"]


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
def test_dims(graph):
  assert graph.dim == (TOKENS + 1 if graph.absorb else TOKENS)
  assert graph.tokens == TOKENS
  assert hash(graph) == hash(type(graph)(TOKENS))


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
def test_rates_are_columns_and_rows_of_q(graph):
  q = q_matrix(graph)
  states = jnp.arange(graph.dim)[None, :]  # (1, D) as a (B, L) token array
  np.testing.assert_allclose(graph.rate(states)[0], q.T, atol=1e-7)  # rate(i) = Q[:, i]
  np.testing.assert_allclose(graph.transp_rate(states)[0], q, atol=1e-7)  # = Q[i, :]


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
def test_transitions_are_matrix_exponentials(graph):
  sigma = np.array([0.05, 0.7, 3.0], np.float32)
  states = np.tile(np.arange(graph.dim, dtype=np.int32), (3, 1))  # (3, D)
  tt = np.asarray(graph.transp_transition(states, sigma))
  if not graph.absorb:
    t = np.asarray(graph.transition(states, sigma))
  for b, s in enumerate(sigma):
    expm = scipy.linalg.expm(float(s) * q_matrix(graph))  # expm[y, x] = P(x -> y)
    np.testing.assert_allclose(tt[b], expm, atol=2e-6)  # transp_transition(i) = row i
    if not graph.absorb:
      np.testing.assert_allclose(t[b], expm.T, atol=2e-6)  # transition(i) = column i


def test_absorbing_transition_is_not_defined():
  with pytest.raises(NotImplementedError):
    diffusion.Absorbing(TOKENS).transition(jnp.zeros((1, 2), jnp.int32), jnp.ones(1))


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
def test_staggered_score_is_expm_applied(graph):
  rng = np.random.default_rng(0)
  dsigma = np.array([0.01, 0.4, 1.5], np.float32)
  score = rng.uniform(0.1, 3.0, (3, 4, graph.dim)).astype(np.float32)
  got = np.asarray(graph.staggered_score(score, dsigma))
  for b, ds in enumerate(dsigma):
    expected = score[b].astype(np.float64) @ scipy.linalg.expm(-float(ds) * q_matrix(graph)).T
    np.testing.assert_allclose(got[b], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
def test_reverse_rate_from_q(graph):
  rng = np.random.default_rng(1)
  x = rng.integers(0, graph.dim, (2, 7)).astype(np.int32)
  score = rng.uniform(0.1, 3.0, (2, 7, graph.dim)).astype(np.float32)
  q = q_matrix(graph)
  expected = q[x] * score  # Q[x, y] s_y
  hot = np.eye(graph.dim, dtype=bool)[x]
  expected[hot] = 0.0
  expected[hot] = -expected.sum(-1)[hot.any(-1)]
  np.testing.assert_allclose(graph.reverse_rate(x, score), expected, rtol=1e-6, atol=1e-6)


# ---- score entropy --------------------------------------------------------------------------

def brute_score_entropy(graph, log_score, sigma, x, x0):
  """sum_{y != x} Q[x, y] (e^{s_y} - r_y s_y + r_y (log r_y - 1)), r_y = p(y|x0)/p(x|x0),
  in float64 over every position (0 log 0 = 0). Also returns the sum of the terms' absolute
  values, the scale of float32 cancellation error."""
  q = q_matrix(graph)
  out = np.zeros(x.shape)
  scale = np.zeros(x.shape)
  for b, l in itertools.product(range(x.shape[0]), range(x.shape[1])):
    p = scipy.linalg.expm(float(sigma[b]) * q)[:, x0[b, l]]  # p(. | x0)
    xi = x[b, l]
    for y in range(graph.dim):
      if y == xi or q[xi, y] == 0 or p[xi] == 0:
        continue
      r = p[y] / p[xi]
      s = float(log_score[b, l, y])
      terms = [np.exp(s) if np.isfinite(s) else 0.0, -r * s if r > 0 else 0.0,
               r * (np.log(r) - 1) if r > 0 else 0.0]
      out[b, l] += q[xi, y] * sum(terms)
      scale[b, l] += q[xi, y] * sum(abs(v) for v in terms)
  return out, scale


def all_pairs(graph, sigma):
  """x, x0 covering every (x, x0) state pair once per sigma row: (len(sigma), D*D)."""
  xs, x0s = np.meshgrid(np.arange(graph.dim), np.arange(graph.dim), indexing="ij")
  x = np.tile(xs.reshape(1, -1), (len(sigma), 1)).astype(np.int32)
  x0 = np.tile(x0s.reshape(1, -1), (len(sigma), 1)).astype(np.int32)
  if graph.absorb:  # x0 is a clean token, never the mask
    x0 = np.where(x0 == graph.dim - 1, 0, x0).astype(np.int32)
  return x, x0


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
def test_score_entropy_brute_force(graph):
  sigma = np.array([0.1, 0.45, 0.6, 2.5], np.float32)  # both sides of the expm1 switch at 0.5
  x, x0 = all_pairs(graph, sigma)
  rng = np.random.default_rng(2)
  log_score = rng.normal(0.0, 1.0, (*x.shape, graph.dim)).astype(np.float32)
  got = np.asarray(graph.score_entropy(log_score, sigma, x, x0))
  expected, scale = brute_score_entropy(graph, log_score, sigma, x, x0)
  # float32: a few ulps of the largest term (the terms cancel).
  np.testing.assert_array_less(np.abs(got - expected), 1e-5 * scale + 1e-6)
  assert np.all(got >= -1e-5 * scale - 1e-6)  # score entropy is non-negative


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
def test_score_entropy_zero_at_true_ratio(graph):
  sigma = np.array([0.1, 0.45, 0.6, 2.5], np.float32)
  x, x0 = all_pairs(graph, sigma)
  log_score = np.zeros((*x.shape, graph.dim))
  for b in range(len(sigma)):
    p = scipy.linalg.expm(float(sigma[b]) * q_matrix(graph))
    cond = p[:, x0[b]].T  # (positions, D): p(y | x0)
    px = cond[np.arange(x.shape[1]), x[b]]
    with np.errstate(divide="ignore", invalid="ignore"):
      log_score[b] = np.log(cond / px[:, None])  # -inf where p(y | x0) = 0
  valid = np.isfinite(log_score).any(-1)  # p(x | x0) > 0
  got = np.asarray(graph.score_entropy(log_score.astype(np.float32), sigma, x, x0))
  assert np.all(np.isfinite(got[valid]))
  expected, scale = brute_score_entropy(graph, log_score, sigma, x, x0)
  np.testing.assert_allclose(expected[valid], 0.0, atol=1e-9)  # the brute force agrees: 0
  # float32: a few ulps of the largest (cancelling) term.
  np.testing.assert_array_less(np.abs(got[valid]), 1e-5 * scale[valid] + 1e-6)
  # Moving the log score away from the truth increases it.
  bumped = np.where(np.isfinite(log_score), log_score + 0.3, log_score).astype(np.float32)
  more = np.asarray(graph.score_entropy(bumped, sigma, x, x0))
  if graph.absorb:
    valid &= x == graph.dim - 1
  assert np.all(more[valid] > 1e-4)


def test_absorbing_unmasked_positions_contribute_nothing():
  graph = diffusion.Absorbing(TOKENS)
  x = jnp.array([[0, 1, TOKENS]], jnp.int32)
  log_score = jnp.full((1, 3, graph.dim), 100.0)  # would overflow exp if it were used
  out = graph.score_entropy(log_score, jnp.array([1.0]), x, jnp.array([[0, 1, 2]]))
  assert out[0, 0] == 0 and out[0, 1] == 0


# ---- random operations -----------------------------------------------------------------------

@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
def test_sample_transition_move_fraction(graph):
  """Per row, the fraction of changed tokens is binomial(n, q) with q = 1 - e^-sigma (absorb)
  or (1 - e^-sigma)(D - 1)/D (uniform: the new token may equal the old one). Tolerance:
  5 binomial standard deviations (two-sided false-failure rate ~6e-7 per row)."""
  sigma = np.array([0.0, 0.05, 0.5, 1.5, 4.0], np.float32)
  n = 20_000
  x0 = jnp.asarray(np.random.default_rng(3).integers(0, TOKENS, (len(sigma), n)), jnp.int32)
  x = np.asarray(graph.sample_transition(rkey(0), x0, sigma))
  assert x.shape == x0.shape and x.dtype == np.int32
  changed = (x != np.asarray(x0)).mean(axis=1)
  q = -np.expm1(-sigma.astype(np.float64))
  if not graph.absorb:
    q *= (graph.dim - 1) / graph.dim
  np.testing.assert_array_less(np.abs(changed - q), 5 * np.sqrt(q * (1 - q) / n) + 1e-12)
  if graph.absorb:
    assert np.all((x == np.asarray(x0)) | (x == graph.dim - 1))
  assert x.min() >= 0 and x.max() < graph.dim


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
def test_sample_limit(graph):
  x = graph.sample_limit(rkey(0), (3, 1000))
  assert x.shape == (3, 1000) and x.dtype == jnp.int32
  if graph.absorb:
    assert np.all(np.asarray(x) == graph.dim - 1)
  else:
    assert set(np.unique(np.asarray(x))) == set(range(graph.dim))


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
def test_sample_rate(graph):
  x = jnp.asarray(np.random.default_rng(4).integers(0, graph.dim, (2, 50)), jnp.int32)
  zero = jnp.zeros((2, 50, graph.dim))
  np.testing.assert_array_equal(graph.sample_rate(rkey(1), x, zero), x)
  # A rate that moves every row entirely to token 0.
  move = jax.nn.one_hot(jnp.zeros_like(x), graph.dim) - jax.nn.one_hot(x, graph.dim)
  np.testing.assert_array_equal(graph.sample_rate(rkey(1), x, move), 0)


# ---- shapes, config, jit -----------------------------------------------------------------------

@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
@pytest.mark.parametrize("bad", [(3, 4), (2,), ()], ids=["BxL", "wrong_batch", "scalar"])
def test_sigma_shape_errors(graph, bad):
  x = jnp.zeros((3, 4), jnp.int32)
  sigma = jnp.ones(bad)
  score = jnp.ones((3, 4, graph.dim))
  key = rkey(0)
  calls = [lambda: graph.transp_transition(x, sigma),
           lambda: graph.sample_transition(key, x, sigma),
           lambda: graph.staggered_score(score, sigma),
           lambda: graph.score_entropy(score, sigma, x, x)]
  if not graph.absorb:
    calls.append(lambda: graph.transition(x, sigma))
  for call in calls:
    with pytest.raises(ValueError, match=r"\(B,\)"):
      call()


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
def test_score_shape_errors(graph):
  x = jnp.zeros((3, 4), jnp.int32)
  with pytest.raises(ValueError, match="score"):
    graph.reverse_rate(x, jnp.ones((3, 4, graph.dim + 1)))
  with pytest.raises(ValueError, match="log_score"):
    graph.score_entropy(jnp.ones((3, 5, graph.dim)), jnp.ones(3), x, x)


def test_get_graph():
  cfg = ml_collections.ConfigDict(dict(type="absorb", tokens=32))
  graph = diffusion.get_graph(cfg)
  assert graph == diffusion.Absorbing(32) and graph.dim == 33 and graph.absorb
  assert diffusion.get_graph(dict(type="uniform", tokens=20)) == diffusion.Uniform(20)
  with pytest.raises(ValueError, match="graph.type"):
    diffusion.get_graph(dict(type="masked", tokens=32))


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPH_IDS)
def test_jit_vmap_match_eager(graph):
  rng = np.random.default_rng(5)
  n, b, l, d = 2, 2, 6, graph.dim
  x = rng.integers(0, d, (n, b, l)).astype(np.int32)
  x0 = rng.integers(0, TOKENS, (n, b, l)).astype(np.int32)
  sigma = rng.uniform(0.1, 2.0, (n, b)).astype(np.float32)
  log_score = rng.normal(size=(n, b, l, d)).astype(np.float32)
  def all_ops(g, x, x0, s, ls):
    return {
        "rate": g.rate(x),
        "transp_rate": g.transp_rate(x),
        "transp_transition": g.transp_transition(x, s),
        "staggered_score": g.staggered_score(jnp.exp(ls), s),
        "reverse_rate": g.reverse_rate(x, jnp.exp(ls)),
        "score_entropy": g.score_entropy(ls, s, x, x0),
        "sample_transition": g.sample_transition(rkey(7), x0, s),
    }

  args = [(x[k], x0[k], sigma[k], log_score[k]) for k in range(n)]
  eager = [all_ops(graph, *a) for a in args]
  jit_fn = jax.jit(all_ops, static_argnums=0)  # the graph is hashable: a static argument
  jitted = [jit_fn(graph, *a) for a in args]
  vmapped = jax.jit(jax.vmap(lambda *a: all_ops(graph, *a)))(x, x0, sigma, log_score)
  for name in eager[0]:
    for k in range(n):
      np.testing.assert_allclose(jitted[k][name], eager[k][name], rtol=1e-6, atol=1e-6,
                                 err_msg=f"jit {name}")
      np.testing.assert_allclose(vmapped[name][k], eager[k][name], rtol=1e-6, atol=1e-6,
                                 err_msg=f"vmap {name}")
