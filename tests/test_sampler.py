"""Sampler: determinism, projector, valid tokens, padding, distribution (chi-square against the
exact score of a known distribution), and the cached variant against the uncached one."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from helpers import TOY_GRAPH as GRAPH, TOY_L as L, TOY_NOISE as NOISE, TOY_V as V
from helpers import FAST, compiled_sampler, run_sampler
from sedd_jax import diffusion
from sedd_jax.sampling import likelihood
from sedd_jax.sampling import sampler

SEQS = np.array(list(itertools.product(range(V), repeat=L)), dtype=np.int32)
PROBS = np.random.default_rng(0).dirichlet(np.full(len(SEQS), 0.8))


def exact_score_fn(graph=GRAPH):
  log_fn = likelihood.exact_absorbing_log_score_fn(graph, SEQS, PROBS)
  return lambda x, sigma: jnp.exp(log_fn(x, sigma))


def random_score_fn(graph, seed=0):
  """A deterministic 'model': positive scores depending on (x, sigma), mass on every token."""
  w = jax.random.normal(jax.random.key(seed), (graph.dim, graph.dim))

  def fn(x, sigma, lengths=None):
    h = jax.nn.one_hot(x, graph.dim) @ w
    h = h + jnp.roll(h, 1, axis=1) + sigma[:, None, None]
    return jnp.exp(jnp.tanh(h))

  return fn


def _codes(x):
  return (x * np.array([V ** (L - 1 - i) for i in range(L)])).sum(-1)


@pytest.mark.parametrize("predictor", ["analytic", "euler", "first_hitting"])
def test_determinism_and_valid_tokens(predictor):
  graph = diffusion.Absorbing(32)
  run = compiled_sampler(random_score_fn(graph), (4, 16), graph=graph, steps=8, predictor=predictor)
  a, b, c = (np.asarray(run(jax.random.key(s), None, None, None, None)) for s in (3, 3, 4))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert a.dtype == np.int32 and a.shape == (4, 16)
  assert (a >= 0).all() and (a < graph.tokens).all()  # no mask left


def test_allowed_tokens_only_residues():
  graph = diffusion.Absorbing(32)
  run = compiled_sampler(random_score_fn(graph, 1), (8, 32), graph=graph, steps=6)
  allowed = np.zeros(graph.dim, bool)
  allowed[4:29] = True  # the 25 ESM-2 residue letters
  x = np.asarray(run(jax.random.key(0), None, None, None, allowed))
  assert ((x >= 4) & (x < 29)).all()
  # Allowing everything, the random score also emits special tokens.
  y = np.asarray(run(jax.random.key(0), None, None, None, np.ones(graph.dim, bool)))
  assert ((y < 4) | (y >= 29)).any() and (y < graph.tokens).all()


@pytest.mark.parametrize("graph", [diffusion.Absorbing(32), diffusion.Uniform(32)],
                         ids=["absorb", "uniform"])
def test_projector_keeps_fixed_positions(graph):
  length = 20
  fixed = np.zeros(length, np.int32)
  mask = np.zeros(length, bool)
  fixed[:5] = [4, 5, 6, 7, 8]
  mask[:5] = True
  fixed[-3:] = [9, 10, 11]
  mask[-3:] = True
  run = compiled_sampler(random_score_fn(graph, 2), (6, length), graph=graph, steps=10,
                         predictor="euler")
  x = np.asarray(run(jax.random.key(0), fixed, mask, None, None))
  np.testing.assert_array_equal(x[:, mask], np.broadcast_to(fixed[mask], (6, mask.sum())))
  # Per-sequence conditioning (B, L).
  ft = np.stack([np.roll(fixed, i) for i in range(6)])
  fm = np.stack([np.roll(mask, i) for i in range(6)])
  x = np.asarray(run(jax.random.key(1), ft, fm, None, None))
  np.testing.assert_array_equal(x[fm], ft[fm])


def test_lengths_give_pad():
  graph = diffusion.Absorbing(32)
  lengths = np.array([3, 10, 16], np.int32)
  seen = {}

  def fn(x, sigma, lengths=None):
    seen["lengths"] = lengths
    return random_score_fn(graph)(x, sigma)

  x = run_sampler(fn, (3, 16), graph=graph, steps=4, lengths=lengths)
  assert seen["lengths"] is not None
  for row, n in zip(x, lengths):
    assert (row[n:] == 1).all() and (row[:n] != 32).all()
  # First-hitting: padded positions are never revealed, so max(lengths) calls in all.
  x, nfe = run_sampler(fn, (3, 16), graph=graph, steps=1, lengths=lengths,
                       predictor="first_hitting", return_nfe=True)
  assert int(nfe) == lengths.max()
  for row, n in zip(x, lengths):
    assert (row[n:] == 1).all() and (row[:n] != 32).all()


def test_bad_arguments():
  fn = exact_score_fn()
  with pytest.raises(ValueError, match="predictor"):
    sampler.sample(jax.random.key(0), fn, GRAPH, NOISE, (2, L), steps=2, predictor="ddim")
  with pytest.raises(ValueError, match="cached"):
    sampler.sample(jax.random.key(0), fn, diffusion.Uniform(3), NOISE, (2, L), steps=2,
                   cached=True)
  with pytest.raises(ValueError, match="absorbing"):
    sampler.sample(jax.random.key(0), fn, diffusion.Uniform(3), NOISE, (2, L), steps=2,
                   predictor="first_hitting")
  with pytest.raises(ValueError, match="draw"):
    sampler.sample(jax.random.key(0), fn, GRAPH, NOISE, (2, L), steps=2, draw="float32")
  with pytest.raises(ValueError, match="remask needs the analytic or first_hitting"):
    sampler.sample(jax.random.key(0), fn, GRAPH, NOISE, (2, L), steps=2, predictor="euler",
                   remask=0.1)
  with pytest.raises(ValueError, match=r"remask must be in \[0, 1\]"):
    sampler.sample(jax.random.key(0), fn, GRAPH, NOISE, (2, L), steps=2, remask=1.5)
  with pytest.raises(ValueError, match="fixed_tokens"):
    sampler.sample(jax.random.key(0), fn, GRAPH, NOISE, (2, L), steps=2,
                   fixed_tokens=np.zeros(L + 1, np.int32), fixed_mask=np.zeros(L + 1, bool))
  # The one home of the option checks, also called by the CLI (messages start with the option).
  uniform = diffusion.Uniform(3)
  for kw, match in ((dict(eps=0.0), r"eps must lie in \(0, 1\)"), (dict(steps=0), "steps must"),
                    (dict(remask=0.1), "remask needs .* absorbing graph"),
                    (dict(cached=True), "cached needs the absorbing graph")):
    with pytest.raises(ValueError, match=f"^{match}"):
      sampler.check_options(uniform, **{"steps": 2, **kw})
  for t in (0.0, -1.0, float("inf"), float("nan")):
    with pytest.raises(ValueError, match="^temperature must be a finite number > 0"):
      sampler.check_options(GRAPH, steps=2, temperature=t)
  with pytest.raises(ValueError, match="^temperature needs the absorbing graph"):
    sampler.check_options(uniform, steps=2, temperature=0.5)
  with pytest.raises(ValueError, match="^reveal_order 'first' is not one of"):
    sampler.check_options(GRAPH, steps=2, predictor="first_hitting", reveal_order="first")
  with pytest.raises(ValueError, match="^reveal_order confidence needs the first_hitting"):
    sampler.check_options(GRAPH, steps=2, reveal_order="confidence")
  sampler.check_options(GRAPH, steps=1, predictor="first_hitting", remask=1.0, draw="reference",
                        temperature=0.5)


def _chi2_pvalue(x):
  counts = np.bincount(_codes(x), minlength=len(SEQS))
  expected = PROBS * len(x)
  return stats.chisquare(counts, expected).pvalue, counts


@pytest.mark.parametrize("predictor,cached,seed", [("analytic", False, 11), ("analytic", True, 12),
                                                   ("euler", False, 13),
                                                   ("first_hitting", False, 14),
                                                   ("remask", True, 15),
                                                   ("first_hitting_remask", False, 16)])
def test_distribution_matches_target(predictor, cached, seed):
  """With the exact score of p0 the sampled sequences follow p0 (chi-square over 27 cells).

  64 steps for L = 3 keep the tau-leaping error (two positions unmasked in one step, each from
  its own conditional) well below the noise of 10k draws; drawing each position from its
  marginal instead gives p ~ 1e-100 here. Each variant uses its own seed, so the cached run is
  an independent check of its distribution (its equality with the uncached one for the same
  key is tested below). The first-hitting sampler is exact: `steps` does not apply to it.
  ReMDM remasking keeps each position's forward marginals (exactly: see the test below), but
  its extra unmasking per step is ~eta alpha_t / (1 - alpha_t) whatever the step size, so
  the error of drawing positions independently within a step grows with eta and the number
  of steps: eta = 0.002 with 256 steps keeps it small (eta = 0.1 gives p ~ 1e-13 here).
  First-hitting's remasking corrector is a Gibbs move, exact at any eta (0.5 here)."""
  n = 10000
  remask = {"remask": 0.002, "first_hitting_remask": 0.5}.get(predictor, 0.0)
  predictor = {"remask": "analytic", "first_hitting_remask": "first_hitting"}.get(predictor,
                                                                                  predictor)
  x = np.asarray(jax.jit(lambda k: sampler.sample(
      k, exact_score_fn(), GRAPH, NOISE, (n, L), steps=256 if remask else 64, predictor=predictor,
      cached=cached, remask=remask))(jax.random.key(seed)))
  p, counts = _chi2_pvalue(x)
  assert p > 1e-4, (p, counts, np.round(PROBS * n))
  marg = np.stack([np.bincount(x[:, i], minlength=V) for i in range(L)])
  rng = np.random.default_rng(seed)
  indep = np.stack([rng.choice(V, n, p=m / n) for m in marg], axis=1)
  assert _chi2_pvalue(indep)[0] < 1e-6  # the test has power against a wrong joint


@pytest.mark.parametrize("eta", [0.9])
def test_remask_keeps_one_position_exact(eta):
  """With one position (no joint to factorise) remasking at any eta leaves the sampled
  distribution exactly the target's, even with 16 steps; the draws differ from eta = 0."""
  graph = diffusion.Absorbing(3)
  log_fn = likelihood.exact_absorbing_log_score_fn(graph, np.arange(3)[:, None], P1)
  fn = lambda x, sigma: jnp.exp(log_fn(x, sigma))  # noqa: E731
  n = 20000
  x = run_sampler(fn, (n, 1), seed=31, graph=graph, steps=16, remask=eta)
  counts = np.bincount(x[:, 0], minlength=3)
  assert stats.chisquare(counts, P1 * n).pvalue > 1e-4, counts
  plain = run_sampler(fn, (n, 1), seed=31, graph=graph, steps=16)
  assert (plain != x).any()


P1 = np.array([0.7, 0.25, 0.05])


def test_tempered_score_closed_form():
  """Non-mask columns 1 : 2 : 5 with mass 8 at T = 1/2 become 8 (1 : 4 : 25) / 30; the mask
  column, zero columns and positions without mass are kept; T = 1 is the identity."""
  s = jnp.array([[[1.0, 2.0, 5.0, 0.0, 7.0], [0.0, 0.0, 0.0, 0.0, 3.0]]])
  out = np.asarray(sampler.tempered_score(s, 0.5))
  np.testing.assert_allclose(out[0, 0], [8 / 30, 32 / 30, 200 / 30, 0.0, 7.0], rtol=1e-6)
  np.testing.assert_array_equal(out[0, 1], [0.0, 0.0, 0.0, 0.0, 3.0])
  np.testing.assert_allclose(np.asarray(sampler.tempered_score(s, 1.0)), s, rtol=1e-6)
  cold = np.asarray(sampler.tempered_score(s, 0.01))[0, 0]
  np.testing.assert_allclose(cold[:3], [0.0, 0.0, 8.0], atol=1e-6)


def _tempered_law(temperature):
  """Brute force: the law of sequences revealed one position at a time in a uniformly random
  order, each token from the target's conditional given the revealed ones, raised to 1/T and
  normalised; averaged over the L! orders."""
  law = np.zeros(len(SEQS))
  for perm in itertools.permutations(range(L)):
    for idx, seq in enumerate(SEQS):
      p = 1.0
      for k, pos in enumerate(perm):
        agree = np.all(SEQS[:, list(perm[:k])] == seq[list(perm[:k])], axis=1)
        cond = np.bincount(SEQS[agree, pos], weights=PROBS[agree], minlength=V)
        q = cond ** (1.0 / temperature)
        p *= q[seq[pos]] / q.sum()
      law[idx] += p / math.factorial(L)
  return law


def _confidence_law(temperature):
  """Brute force: the law of sequences revealed one position at a time, each time at the
  unrevealed position whose tempered conditional has the largest top probability (the first
  such position on ties), its token drawn from that tempered conditional."""
  law = np.zeros(len(SEQS))
  for idx, seq in enumerate(SEQS):
    revealed, prob = [], 1.0
    for _ in range(L):
      agree = np.all(SEQS[:, revealed] == seq[revealed], axis=1)
      best = None
      for pos in sorted(set(range(L)) - set(revealed)):
        q = np.bincount(SEQS[agree, pos], weights=PROBS[agree], minlength=V) ** (1 / temperature)
        q /= q.sum()
        if best is None or q.max() > best[1].max():
          best = (pos, q)
      prob *= best[1][seq[best[0]]]
      revealed.append(best[0])
    law[idx] = prob
  return law


def _pooled_chi2_pvalue(counts, expected):
  """Chi-square with the cells expected below 5 pooled into one (a peaked law has some)."""
  small = expected < 5
  c = np.append(counts[~small], counts[small].sum())
  e = np.append(expected[~small], expected[small].sum())
  return stats.chisquare(c, e * c.sum() / e.sum()).pvalue


@pytest.mark.parametrize("predictor,seed", [("first_hitting", 41), ("analytic", 42)])
def test_temperature_follows_the_tempered_conditionals(predictor, seed):
  """At T = 1/2 the sampled sequences follow the brute-force tempered law (chi-square over the
  27 cells), which differs from the target; T = 1 gives the plain sampler's draws. The analytic
  sampler needs 256 steps here: its tau-leaping error (two reveals in one step) shows at 64
  (p ~ 3e-4) on this peaked law."""
  n, temperature = 10000, 0.5
  law = _tempered_law(temperature)
  np.testing.assert_allclose(_tempered_law(1.0), PROBS, rtol=1e-9)  # the brute force at T = 1
  x = run_sampler(exact_score_fn(), (n, L), seed=seed, steps=256, predictor=predictor,
                  temperature=temperature)
  counts = np.bincount(_codes(x), minlength=len(SEQS))
  assert _pooled_chi2_pvalue(counts, law * n) > 1e-3, (counts, np.round(law * n))
  assert _pooled_chi2_pvalue(counts, PROBS * n) < 1e-6  # it tells T = 1/2 from T = 1
  plain = run_sampler(exact_score_fn(), (64, L), seed=seed, steps=64, predictor=predictor)
  same = run_sampler(exact_score_fn(), (64, L), seed=seed, steps=64, predictor=predictor,
                     temperature=1.0)
  np.testing.assert_array_equal(plain, same)


def test_confidence_order_follows_its_brute_force_law():
  """reveal_order="confidence" (first_hitting): with the exact score at T = 1 the target itself
  (the chain rule in any order); at T = 1/2 the brute-force law of the confident-first order,
  which the test tells from the random order's tempered law."""
  n = 10000
  for temperature, seed in ((1.0, 43), (0.5, 44)):
    law = _confidence_law(temperature)
    x = run_sampler(exact_score_fn(), (n, L), seed=seed, steps=1, predictor="first_hitting",
                    temperature=temperature, reveal_order="confidence")
    counts = np.bincount(_codes(x), minlength=len(SEQS))
    assert _pooled_chi2_pvalue(counts, law * n) > 1e-3, (temperature, counts, np.round(law * n))
  np.testing.assert_allclose(_confidence_law(1.0), PROBS, rtol=1e-9)
  assert _pooled_chi2_pvalue(counts, _tempered_law(0.5) * n) < 1e-6


def test_cached_equals_uncached_given_same_draws():
  """For a score of the exact form p(y | unmasked) / (e^sigma - 1), reusing the rescaled
  output is exact: same key, same tokens (and fewer model calls)."""
  fn = exact_score_fn()
  xu, nu = run_sampler(fn, (64, L), seed=5, steps=128, return_nfe=True)
  xc, nc = run_sampler(fn, (64, L), seed=5, steps=128, cached=True, return_nfe=True)
  np.testing.assert_array_equal(xu, xc)
  assert int(nu) == 129
  assert int(nc) < 129  # 64 x 3 tokens unmask over 128 steps: some steps change nothing
  # One sequence: at most one call per unmasking event, plus the first and the denoise call.
  _, n1 = run_sampler(fn, (1, L), seed=0, steps=128, cached=True, return_nfe=True)
  assert int(n1) <= L + 2


def test_sample_batched_chunks_and_determinism():
  def fn(x, sigma, lengths=None):
    return exact_score_fn()(x, sigma)

  kw = dict(batch_size=4, steps=8, score_fn=fn, progress=False, compiler_options=FAST)
  a = sampler.sample_batched(jax.random.key(1), GRAPH, NOISE, 10, L, **kw)
  b = sampler.sample_batched(jax.random.key(1), GRAPH, NOISE, 10, L, **kw)
  assert a.shape == (10, L) and a.dtype == np.int32
  np.testing.assert_array_equal(a, b)
  # The first chunks do not depend on num.
  c = sampler.sample_batched(jax.random.key(1), GRAPH, NOISE, 8, L, **kw)
  np.testing.assert_array_equal(a[:8], c)
  assert ((a >= 0) & (a < V)).all()
  fixed = np.array([[2, 0, 0]] * 5, np.int32)
  e = sampler.sample_batched(jax.random.key(1), GRAPH, NOISE, 5, L,
                             lengths=np.array([1, 2, 3, 1, 2]), fixed_tokens=fixed,
                             fixed_mask=fixed > 0, **kw)
  assert (e[:, 0] == 2).all()
  assert (e[0, 1:] == 1).all() and (e[1, 2:] == 1).all()  # <pad> = 1 (also a toy token)


def test_model_score_fn_wraps_log_score():
  class Toy:
    mode = "train"

    def eval(self):
      self.mode = "eval"

    def __call__(self, x, sigma, lengths=None):
      return jnp.zeros(x.shape + (4,)) + math.log(2.0)

  toy = Toy()
  fn = sampler.model_score_fn(toy)
  assert toy.mode == "eval"
  np.testing.assert_allclose(fn(jnp.zeros((1, 2), jnp.int32), jnp.ones((1,))), 2.0, rtol=1e-6)


def test_row_keyed_draws_each_row_from_its_own_key():
  """Row b of every (B, ...) draw of a row-keyed key is the draw of keys[b] for shape (...);
  fold_in and split act row by row; other leading dimensions and untyped keys are refused."""
  keys = sampler.sequence_keys(jax.random.key(3), np.arange(4))
  for b in range(4):
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(keys[b])),
                                  np.asarray(jax.random.key_data(jax.random.fold_in(
                                      jax.random.key(3), b))))
  rk = sampler.row_keyed(keys)

  @jax.jit
  def draws(rk, keys):
    rows = (jax.random.uniform(jax.random.fold_in(rk, 7), (4, 5)),
            jax.random.bits(jax.random.split(rk)[1], (4, 2, 3)),
            jax.random.randint(rk, (4, 6), 0, 9))
    each = jax.vmap(lambda k: (jax.random.uniform(jax.random.fold_in(k, 7), (5,)),
                               jax.random.bits(jax.random.split(k)[1], (2, 3)),
                               jax.random.randint(k, (6,), 0, 9)))(keys)
    return rows, each

  rows, each = draws(rk, keys)
  for x, y in zip(rows, each):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  u = np.asarray(rows[0])
  assert len(np.unique(u)) == u.size  # the rows differ
  with pytest.raises(ValueError, match="draws arrays of leading dimension 4; got shape"):
    jax.random.uniform(rk, (3, 4))
  with pytest.raises(ValueError, match=r"keys must be a \(B,\) array of typed PRNG keys"):
    sampler.row_keyed(jax.random.key_data(keys))


@pytest.mark.parametrize("predictor,remask", [("analytic", 0.2), ("first_hitting", 0.0),
                                             ("first_hitting", 0.5)])
def test_key_per_sequence_samples_do_not_depend_on_the_batch(predictor, remask):
  """With one key per sequence, sequence n is the same whatever the batch size (and its place
  in a chunk), and the same as when drawn alone from fold_in(key, n) (random score with mass on
  every token; mixed lengths and per-sequence conditioning)."""
  graph = diffusion.Absorbing(32)
  fn = random_score_fn(graph, 3)
  lengths = np.array([5, 12, 9, 12, 3], np.int32)
  fixed = np.zeros((5, 12), np.int32)
  mask = np.zeros((5, 12), bool)
  fixed[1, :2], mask[1, :2] = [6, 7], True
  fixed[3, 8:], mask[3, 8:] = [9, 10, 11, 12], True
  key = jax.random.key(7)
  a, b = (sampler.sample_batched(key, graph, NOISE, 5, 12, batch_size=bs, steps=6,
                                 predictor=predictor, remask=remask, score_fn=fn,
                                 lengths=lengths, fixed_tokens=fixed, fixed_mask=mask,
                                 progress=False, compiler_options=FAST, key_per_sequence=True)
          for bs in (2, 5))
  np.testing.assert_array_equal(a, b)
  alone = compiled_sampler(fn, (1, 12), graph=graph, steps=6, predictor=predictor,
                           remask=remask)(sampler.row_keyed(sampler.sequence_keys(key, [3])),
                                          fixed[3:4], mask[3:4], lengths[3:4], None)
  np.testing.assert_array_equal(np.asarray(alone)[0], a[3])
  assert (a[mask] == fixed[mask]).all() and (a[1, :5] != a[2, :5]).any()
  for row, n in zip(a, lengths):
    assert (row[n:] == 1).all() and (row[:n] != graph.mask).all()
