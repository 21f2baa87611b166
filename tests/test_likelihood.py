"""Negative ELBO: tightness with the exact score (quadrature and Monte-Carlo), standard errors,
the prior term, the unigram baseline, packed rows, and `score_sequences` over lists of
sequences (batching / packing invariance, the data-set error, the input errors)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import FAST, randomize
from sedd_jax import diffusion
from sedd_jax.data import tokenizers
from sedd_jax.sampling import likelihood

V, L = 3, 3
SEQS = np.array(list(itertools.product(range(V), repeat=L)), dtype=np.int32)
PROBS = np.random.default_rng(1).dirichlet(np.full(len(SEQS), 0.8))
GRAPH = diffusion.Absorbing(V)
NOISE = diffusion.LogLinear(eps=1e-4)


def _nelbo(fn, x0, num_samples, t_sampling, seed=0, **kw):
  run = jax.jit(lambda k, x: likelihood.nelbo(k, fn, GRAPH, NOISE, x, num_samples=num_samples,
                                              t_sampling=t_sampling, **kw),
                compiler_options=FAST)
  return jax.tree.map(np.asarray, run(jax.random.key(seed), jnp.asarray(x0)))


def _quadrature(fn, x0, nodes=96):
  """int_0^1 E_{x_t | x0}[loss(t)] dt exactly over the 2^L mask patterns, Gauss-Legendre in t."""
  u, w = np.polynomial.legendre.leggauss(nodes)
  ts = (u + 1) / 2
  w = w / 2
  patterns = np.array(list(itertools.product([0, 1], repeat=L)), bool)  # (P, L), True = masked
  p_mask = (1 - NOISE.eps) * ts  # (T,): 1 - e^-sigma(t)
  q = np.prod(np.where(patterns[None], p_mask[:, None, None], 1 - p_mask[:, None, None]),
              axis=-1)  # (T, P)
  x = np.where(patterns[None, :, None, :], GRAPH.mask, x0[None, None])  # (1, P, N, L)
  x = np.broadcast_to(x, (len(ts),) + x.shape[1:])  # (T, P, N, L)
  tt = np.broadcast_to(ts[:, None, None], x.shape[:3]).reshape(-1).astype(np.float32)
  x = jnp.asarray(x.reshape(-1, L), jnp.int32)
  x0_all = jnp.asarray(np.broadcast_to(x0, (len(ts), len(patterns)) + x0.shape).reshape(-1, L))
  loss = diffusion.score_entropy_loss(GRAPH, NOISE, fn(x, NOISE.total_noise(tt)), x, x0_all,
                                      jnp.asarray(tt))
  loss = np.asarray(loss, np.float64).reshape(len(ts), len(patterns), len(x0))
  return np.einsum("t,tp,tpn->n", w, q, loss)


def test_exact_score_bound_is_tight_quadrature_and_mc():
  """With the exact score of p0 the bound equals -log p0(x0): by quadrature (to the
  truncation of sigma(1), ~eps L), and Monte-Carlo within 4 standard errors of it."""
  fn = likelihood.exact_absorbing_log_score_fn(GRAPH, SEQS, PROBS)
  idx = np.array([0, 5, 13, 26])
  x0 = SEQS[idx]
  quad = _quadrature(fn, x0)
  np.testing.assert_allclose(quad, -np.log(PROBS[idx]), rtol=2e-3, atol=2e-3)
  for scheme in ("stratified", "antithetic"):
    res = _nelbo(fn, x0, 1024, scheme)
    assert np.all(np.abs(res.nelbo - quad) < 4 * res.se + 1e-3), (scheme, res.nelbo, quad, res.se)
    np.testing.assert_array_equal(res.tokens, [L] * 4)
    np.testing.assert_allclose(res.per_token, res.nelbo / L)


def test_single_sequence_distribution_gives_zero():
  """p0 = a single sequence: the exact score makes every integrand value 0, NELBO = 0 = -log 1."""
  seqs = SEQS[[7]]
  fn = likelihood.exact_absorbing_log_score_fn(GRAPH, seqs, np.ones(1))
  res = _nelbo(fn, seqs, 64, "iid")
  np.testing.assert_allclose(res.nelbo, 0.0, atol=1e-3)


def test_standard_error_shrinks_with_samples():
  fn = likelihood.exact_absorbing_log_score_fn(GRAPH, SEQS, PROBS)
  small = _nelbo(fn, SEQS, 64, "iid", seed=1)
  large = _nelbo(fn, SEQS, 1024, "iid", seed=2)
  # Expected 1/sqrt(16) = 0.25; the draws are heavy-tailed near t = 0 (see likelihood's
  # docstring), so the 64-draw SE is often an underestimate: the median ratio is ~0.3.
  ratio = np.median(large.se / small.se)
  assert 0.15 < ratio < 0.45, ratio
  # The two estimates agree with each other within their errors, on average over sequences.
  z = (small.nelbo - large.nelbo) / np.sqrt(small.se ** 2 + large.se ** 2)
  assert abs(z.mean()) < 4 / math.sqrt(len(z)) + 0.5


def test_time_schemes():
  t = likelihood.sample_times(jax.random.key(0), 8, 3, "stratified")
  assert t.shape == (8, 3)
  k = np.floor(np.asarray(t) * 8)
  np.testing.assert_array_equal(k, np.repeat(np.arange(8)[:, None], 3, axis=1))
  t = np.asarray(likelihood.sample_times(jax.random.key(0), 4, 2, "antithetic", t_min=0.2))
  np.testing.assert_allclose(t[0] + t[1], 1.2, rtol=1e-6)  # (0.2 + 0.8 v) + (0.2 + 0.8 (1 - v))
  assert (t > 0.2).all() and (t < 1).all()
  with pytest.raises(ValueError, match="even"):
    likelihood.sample_times(jax.random.key(0), 3, 2, "antithetic")
  with pytest.raises(ValueError, match="t_sampling"):
    likelihood.sample_times(jax.random.key(0), 3, 2, "sobol")


def test_padding_is_ignored():
  graph = diffusion.Absorbing(32)

  def fn(x, sigma, lengths=None):
    return jnp.zeros(x.shape + (graph.dim,)) - jnp.log(jnp.expm1(sigma))[:, None, None]

  x0 = np.full((2, 6), 1, np.int32)
  x0[0, :4] = [4, 5, 6, 7]
  x0[1, :2] = [8, 9]
  lengths = np.array([4, 2], np.int32)
  run = lambda x: jax.tree.map(np.asarray, likelihood.nelbo(
      jax.random.key(0), fn, graph, NOISE, x, lengths=lengths, num_samples=4))
  a = run(x0)
  x1 = x0.copy()
  x1[0, 4:] = 20
  x1[1, 2:] = 21
  b = run(x1)
  np.testing.assert_allclose(a.nelbo, b.nelbo)
  np.testing.assert_array_equal(a.tokens, lengths)


def test_uniform_prior_term():
  graph = diffusion.Uniform(4)
  noise = diffusion.Geometric(1e-3, 2.0)
  x0 = jnp.zeros((1, 5), jnp.int32)
  prior = float(likelihood.prior_term(graph, noise, x0, jnp.ones((1, 5)))[0])
  e = math.exp(-2.0)
  p_other = (1 - e) / 4
  p_stay = 1 - 3 * p_other
  kl = p_stay * math.log(4 * p_stay) + 3 * p_other * math.log(4 * p_other)
  assert prior == pytest.approx(5 * kl, rel=1e-5)
  assert float(likelihood.prior_term(GRAPH, NOISE, x0, jnp.ones((1, 5)))[0]) == 0.0


def test_unigram_baseline_reads_the_training_tokens_one_chunk_at_a_time():
  """A 16 MB training stream in 1 MB chunks is counted without holding it: the peak of numpy's
  allocations stays a few chunks; the NLL is the closed form of the known counts."""
  import tracemalloc  # noqa: PLC0415

  chunk, n = 1 << 20, 16
  def stream():  # symbol 4 in every position except one 5 and two 6 per chunk
    for _ in range(n):
      x = np.full(chunk, 4, np.uint8)
      x[:3] = [5, 6, 6]
      yield x

  tracemalloc.start()
  try:
    nll = likelihood.unigram_baseline(stream(), [np.array([5, 6])], vocab=[4, 5, 6])
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  total = n * chunk + 3
  p5, p6 = (n + 1) / total, (2 * n + 1) / total
  assert nll == pytest.approx(-(math.log(p5) + math.log(p6)) / 2, rel=1e-12)
  assert peak < 8 * chunk, peak  # half the stream


def test_unigram_baseline_and_summary():
  # Counts A 2, B 1 (+1 each): p(A) = 3/5, p(B) = 2/5.
  nll = likelihood.unigram_baseline(["AAB"], ["AB"])
  assert nll == pytest.approx(-(math.log(3 / 5) + math.log(2 / 5)) / 2)
  nll = likelihood.unigram_baseline([np.array([4, 4, 5])], [np.array([6])], vocab=[4, 5, 6])
  assert nll == pytest.approx(-math.log(1 / 6))
  with pytest.raises(ValueError, match="not in vocab"):
    likelihood.unigram_baseline(["AAB"], ["C"], vocab="AB")
  # From counts (a bundle's): the same formula; a 0 count is no symbol seen.
  nll = likelihood.unigram_baseline_from_counts({"A": 2, "B": 1, "C": 0}, ["AB"])
  assert nll == likelihood.unigram_baseline(["AAB"], ["AB"])
  assert nll == pytest.approx(-(math.log(3 / 5) + math.log(2 / 5)) / 2)
  nll = likelihood.unigram_baseline_from_counts({4: 2, 5: 1}, [np.array([6])], vocab=[4, 5, 6])
  assert nll == pytest.approx(-math.log(1 / 6))
  with pytest.raises(ValueError, match="train_counts must be counts >= 0"):
    likelihood.unigram_baseline_from_counts({"A": -1}, ["A"])
  r = likelihood.NelboResult(nelbo=np.array([4.0, 2.0]), se=np.array([0.3, 0.4]),
                             prior=np.zeros(2), tokens=np.array([2.0, 4.0]))
  s = likelihood.summarize([r], NOISE)
  assert s["nelbo_per_token"] == pytest.approx(1.0)
  assert s["bits_per_residue"] == pytest.approx(1.0 / math.log(2))
  assert s["se_per_token"] == pytest.approx(0.5 / 6)
  assert s["perplexity"] == pytest.approx(math.e)
  assert s["terminal_unmasked_prob"] == pytest.approx(1e-4, rel=1e-3)


def _exact_masked_nll(x0, mask_frac):
  """E over independent masks of sum_{masked i} -log p0(x0_i | unmasked), by enumeration of the
  2^L patterns: (N,) for x0 (N, L)."""
  out = np.zeros(len(x0))
  for pattern in itertools.product([0, 1], repeat=L):
    masked = np.array(pattern, bool)
    weight = np.prod(np.where(masked, mask_frac, 1 - mask_frac))
    for n, x in enumerate(x0):
      agree = np.all((SEQS == x)[:, ~masked], axis=1)
      for i in np.flatnonzero(masked):
        cond = PROBS[agree & (SEQS[:, i] == x[i])].sum() / PROBS[agree].sum()
        out[n] += weight * -np.log(cond)
  return out


def test_masked_nll_matches_enumeration():
  """With the exact score the masked NLL per masked token converges to the enumerated
  E[sum -log p0(x_i | unmasked)] / E[masked count] (ratio of expectations); 3000 draws per
  sequence, four sequences, within 5 standard errors of the pooled ratio."""
  fn = likelihood.exact_absorbing_log_score_fn(GRAPH, SEQS, PROBS)
  x0 = SEQS[np.array([0, 5, 13, 26])]
  frac = 0.3
  run = jax.jit(lambda k: likelihood.masked_nll(k, fn, GRAPH, jnp.asarray(x0), mask_frac=frac,
                                                num_samples=3000), compiler_options=FAST)
  nll, count = (np.asarray(a, np.float64) for a in run(jax.random.key(3)))
  want = _exact_masked_nll(x0, frac).sum() / (frac * L * len(x0))
  got = nll.sum() / count.sum()
  # SE of a ratio estimator ~ sd(per-token cost) / sqrt(count); per-token costs are < 6 nats.
  assert abs(got - want) < 5 * 6 / np.sqrt(count.sum()), (got, want)
  assert abs(got - want) < 0.05 * want
  s = likelihood.pseudo_perplexity_summary(nll, count, frac)
  assert s["pseudo_perplexity"] == pytest.approx(np.exp(got))
  assert s["masked_bits_per_residue"] == pytest.approx(got / np.log(2))
  with pytest.raises(ValueError, match="mask_frac"):
    likelihood.masked_nll(jax.random.key(0), fn, GRAPH, x0, mask_frac=1.0)
  with pytest.raises(ValueError, match="absorbing"):
    likelihood.masked_nll(jax.random.key(0), fn, diffusion.Uniform(V), x0)


@pytest.mark.parametrize("graph_type", ["absorb", "uniform"])  # uniform: a prior term too
def test_packed_nelbo_equals_each_sequence_alone_at_the_same_draws(graph_type):
  """Packed rows: per-sequence estimates are those of each sequence alone with the row's t and
  the row's corrupted tokens (the model sees only its own sequence)."""
  import ml_collections
  from flax import nnx

  from sedd_jax.data import pipeline
  from sedd_jax.model import DDiT

  absorb = graph_type == "absorb"
  graph = diffusion.Absorbing(20) if absorb else diffusion.Uniform(20)
  cfg = ml_collections.ConfigDict(dict(hidden_size=16, n_heads=2, n_blocks=1, cond_dim=8,
                                       dropout=0.0, scale_by_sigma=absorb, length=32,
                                       attention="xla", dtype="float32"))
  model = randomize(DDiT(cfg, graph.dim, absorb, nnx.Rngs(0)))
  fn = likelihood.model_log_score_fn(model)
  rng = np.random.default_rng(2)
  seqs = [rng.integers(0, 20, n).astype(np.int32) for n in (6, 9, 4)]
  rows = pipeline.pack_sequences(seqs, 24)
  assert rows["tokens"].shape == (1, 24)
  order = rows["index"][0, :3]
  key, k = jax.random.key(5), 2
  got = jax.jit(lambda key, packing: likelihood.nelbo(
      key, fn, graph, NOISE, rows["tokens"], lengths=rows["lengths"], num_samples=k,
      **packing))(key, {"segment_ids": rows["segment_ids"], "positions": rows["positions"]})
  key_t, key_x = jax.random.split(key)
  ts = likelihood.sample_times(key_t, k, 1)

  spans = []
  for i in order:
    spans.append((spans[-1][0] + spans[-1][1] if spans else 0, len(seqs[i])))

  @jax.jit
  def alone(key_x, ts):
    """(K, 3) losses of each sequence alone, with the row's t and corrupted tokens."""
    out = []
    for j in range(k):
      x = diffusion.perturb(jax.random.fold_in(key_x, j), graph, NOISE, rows["tokens"], ts[j])
      for start, n in spans:
        piece, x0 = x[:, start:start + n], rows["tokens"][:, start:start + n]
        score = fn(piece, NOISE.total_noise(ts[j]))
        out.append(diffusion.score_entropy_loss(graph, NOISE, score, piece, x0, ts[j])[0])
    return jnp.stack(out).reshape(k, len(spans))

  want = np.asarray(alone(key_x, ts)).mean(0)
  for col, (start, n) in enumerate(spans):
    prior = likelihood.prior_term(graph, NOISE, rows["tokens"][:, start:start + n],
                                  np.ones((1, n)))[0]
    np.testing.assert_allclose(got.nelbo[0, col], want[col] + prior, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.prior[0, col], prior, rtol=1e-5, atol=1e-6)
    assert got.tokens[0, col] == n
  assert np.all(np.asarray(got.tokens[0, 3:]) == 0)


def _micro_ddit():
  """A random one-block DDiT of length 32 over the ESM-2 ids (absorbing, D = 33)."""
  from flax import nnx

  from helpers import ddit_config
  from sedd_jax.model import DDiT

  return randomize(DDiT(ddit_config(length=32, n_blocks=1), 33, True, nnx.Rngs(0)), scale=0.1)


PROTEINS = ["MKVLAGHTRE", "ACD", "WWYYPPGGSSTTNNQQ", "MK", "LLLLLLLLLLLLLLLLLLLL", "EDRK",
            "HHHHHH", "CPGA", "MSTNPKPQRKTKRNTNRRPQDVKFPGG"]


def test_score_sequences_does_not_depend_on_batching_packing_or_neighbours():
  """Per-sequence draws (the times shared, the masks keyed by the sequence's index): batch
  sizes 1 and 7, packed and one-per-row rows, and a sequence scored alone (as index 0) give
  the same numbers to float tolerance."""
  graph = diffusion.Absorbing(32)
  model = _micro_ddit()
  run = lambda seqs, **kw: likelihood.score_sequences(  # noqa: E731
      model, graph, NOISE, seqs, max_length=32, num_samples=4, **kw)
  a = run(PROTEINS, batch_size=1)
  b = run(PROTEINS, batch_size=7)
  c = run(PROTEINS, batch_size=4, pack=False)
  for other in (b, c):
    np.testing.assert_allclose(other.nelbo, a.nelbo, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(other.nelbo_se, a.nelbo_se, rtol=1e-4, atol=1e-5)
  alone = run(PROTEINS[:1], batch_size=1)
  np.testing.assert_allclose(alone.nelbo, a.nelbo[:1], rtol=1e-5)
  np.testing.assert_array_equal(a.length, [len(s) for s in PROTEINS])
  np.testing.assert_allclose(a.per_residue, a.nelbo / a.length)
  np.testing.assert_allclose(a.per_residue_se, a.nelbo_se / a.length)
  np.testing.assert_array_equal(a.prior, 0.0)
  assert np.all(np.isfinite(a.nelbo)) and np.all(a.nelbo > 0) and np.all(a.nelbo_se > 0)
  ids = [tokenizers.ProteinTokenizer().encode(s) for s in PROTEINS]  # as the strings
  np.testing.assert_allclose(run(ids, batch_size=7).nelbo, b.nelbo, rtol=1e-6)


def test_score_sequences_is_tight_with_the_exact_score():
  """The toy distribution's exact score through a model-like callable: each estimate within 4
  standard errors of -log p0 (256 antithetic draws), and so is the data-set total."""
  exact = likelihood.exact_absorbing_log_score_fn(GRAPH, SEQS, PROBS)
  model = lambda x, sigma, lengths=None, **packing: exact(x, sigma)  # noqa: E731
  want = -np.log(PROBS)
  res = likelihood.score_sequences(model, GRAPH, NOISE, list(SEQS), max_length=L,
                                   num_samples=256, pack=False, batch_size=27)
  assert np.all(np.abs(res.nelbo - want) < 4 * res.nelbo_se + 2e-3), (res.nelbo, want)
  assert abs(res.nelbo.sum() - want.sum()) < 4 * res.total_se
  summary = likelihood.summarize([res.to_nelbo_result()], NOISE, total_se=res.total_se)
  assert summary["se_per_token"] == pytest.approx(res.total_se / (L * len(SEQS)))
  assert summary["nelbo_per_token"] == pytest.approx(res.nelbo.sum() / (L * len(SEQS)))


def test_total_se_is_the_spread_of_the_total_over_seeds():
  """The sequences share the times: with an integrand that depends mostly on t (a zero score
  under the uniform graph), the variance of the summed nelbo over 40 seeds is what total_se^2
  estimates, and about 4x the independent-errors sum of se^2."""
  graph = diffusion.Uniform(V)
  zero = lambda x, sigma, lengths=None, **packing: jnp.zeros(x.shape + (V,))  # noqa: E731
  totals, total_var, indep_var = [], [], []
  for seed in range(40):
    r = likelihood.score_sequences(zero, graph, NOISE, list(SEQS), max_length=L,
                                   num_samples=8, seed=seed, t_sampling="iid", pack=False,
                                   batch_size=27)
    totals.append(r.nelbo.sum())
    total_var.append(r.total_se ** 2)
    indep_var.append(np.sum(r.nelbo_se ** 2))
  var = np.var(totals, ddof=1)
  assert 0.5 < np.mean(total_var) / var < 2.0, (np.mean(total_var), var)
  assert np.mean(indep_var) / var < 0.5, (np.mean(indep_var), var)


def test_score_sequences_adds_the_uniform_prior():
  graph = diffusion.Uniform(32)
  noise = diffusion.Geometric(1e-3, 2.0)
  zero = lambda x, sigma, lengths=None, **packing: jnp.zeros(x.shape + (32,))  # noqa: E731
  res = likelihood.score_sequences(zero, graph, noise, ["MKV", "AC"], max_length=8,
                                   num_samples=2)
  per_token = float(likelihood.prior_term(graph, noise, jnp.zeros((1, 1), jnp.int32),
                                          jnp.ones((1, 1)))[0])
  np.testing.assert_allclose(res.prior, [3 * per_token, 2 * per_token], rtol=1e-6)
  assert np.all(res.nelbo > res.prior)


@pytest.mark.parametrize("seqs,match", [
    (["MKV", "MJK"], r"seqs\[1\]: invalid character 'J' \(0x4a\) at column 2"),
    (["MKV", "M" * 9], r"seqs\[1\] has length 9 > max_length 8"),
    (["MKV", ""], r"seqs\[1\] is empty"),
    ([np.array([4, 40])], r"seqs\[0\] holds id 40 at position 2; ids must be in \[0, 32\)"),
    ([np.zeros((2, 2), np.int32)], r"seqs\[0\] must be a residue string or a 1-D integer"),
    ("MKV", "seqs must be a sequence of sequences"),
    ([], "seqs is empty"),
])
def test_bad_sequences_are_named(seqs, match):
  with pytest.raises(ValueError, match=match):
    likelihood.score_sequences(None, diffusion.Absorbing(32), NOISE, seqs, max_length=8)


def test_short_peptides_are_packed():
  """The packed rows of `sequence_rows` (what score_sequences and evaluate run on)."""
  rng = np.random.default_rng(0)
  seqs = [rng.integers(4, 29, n).astype(np.int32) for n in rng.integers(8, 40, 50)]
  rows = likelihood.sequence_rows(seqs, 128, pack=True)
  full = likelihood.sequence_rows(seqs, 128, pack=False)
  idx = rows["index"][rows["index"] >= 0]
  assert sorted(idx.tolist()) == list(range(50))  # every sequence once
  for r, row in enumerate(rows["index"]):
    for s, i in enumerate(row[row >= 0], 1):
      np.testing.assert_array_equal(rows["tokens"][r][rows["segment_ids"][r] == s], seqs[i])

  def padding(b):
    return 1 - b["lengths"].sum() / b["tokens"].size

  assert padding(rows) < 0.1 < 0.3 < padding(full)
  assert len(rows["tokens"]) < len(seqs) // 5
