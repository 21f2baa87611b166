"""Mutation effects: parsing and its errors, the ELBO-difference and masked-marginal estimators
against the exact log-likelihood ratios of a toy distribution, antisymmetry, packing."""

import itertools

import numpy as np
import pytest
from flax import nnx

from helpers import ddit_config, randomize
from sedd_jax import diffusion
from sedd_jax.data import tokenizers
from sedd_jax.model import DDiT
from sedd_jax.sampling import likelihood
from sedd_jax.sampling import mutations

# The toy: a Potts distribution over the 4^5 sequences of the letters LAGV (fields N(0, 1),
# couplings N(0, 0.25)), its exact absorbing score, and a wild type of median probability.
LETTERS, L = "LAGV", 5
GRAPH = diffusion.Absorbing(tokenizers.ProteinTokenizer.num_tokens_absorb)
NOISE = diffusion.LogLinear(eps=1e-3)
_COMBOS = np.array(list(itertools.product(range(4), repeat=L)))
_RNG = np.random.default_rng(0)
_H, _J = _RNG.normal(0, 1.0, (L, 4)), _RNG.normal(0, 0.25, (L, L, 4, 4))
_LOGITS = _H[np.arange(L), _COMBOS].sum(1) + sum(
    _J[i, j, _COMBOS[:, i], _COMBOS[:, j]] for i in range(L) for j in range(i + 1, L))
PROBS = np.exp(_LOGITS - _LOGITS.max()) / np.exp(_LOGITS - _LOGITS.max()).sum()
STRINGS = ["".join(LETTERS[c] for c in combo) for combo in _COMBOS]
LOG_P = dict(zip(STRINGS, np.log(PROBS)))
_EXACT = likelihood.exact_absorbing_log_score_fn(
    GRAPH, np.array([tokenizers.ProteinTokenizer().encode(s) for s in STRINGS]), PROBS)
WT = STRINGS[int(np.argsort(PROBS)[len(PROBS) // 2])]
SINGLES = [f"{WT[p]}{p + 1}{b}" for p in range(L) for b in LETTERS if b != WT[p]]


def exact_model(x, sigma, lengths=None, **packing):
  """The toy's exact log score as a model-like callable (one sequence per row: pack=False)."""
  assert not packing
  return _EXACT(x, sigma)


def exact_delta(wt, mutation_list):
  """log p0(variant) - log p0(wt) by brute force."""
  variants = mutations.apply_mutations(wt, mutations.parse_mutations(wt, mutation_list))
  return np.array([LOG_P[v] - LOG_P[wt] for v in variants])


def spearman(a, b):
  """Spearman's rank correlation (no ties in the toy's exact values)."""
  rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
  return float(np.corrcoef(rank(a), rank(b))[0, 1])


def reverse(wt, mutation):
  """The mutation that takes the variant back to `wt`, and the variant."""
  variant = mutations.apply_mutations(wt, mutations.parse_mutations(wt, [mutation]))[0]
  back = ":".join(f"{b}{p}{a}" for p, a, b in mutations.parse_mutations(wt, [mutation])[0])
  return variant, back


def test_parse_and_apply():
  parsed = mutations.parse_mutations("MKVLA", ["K2R", "M1A:A5G", "V3V"])
  assert parsed == [((2, "K", "R"),), ((1, "M", "A"), (5, "A", "G")), ((3, "V", "V"),)]
  assert mutations.apply_mutations("mkvla*", parsed) == ["MRVLA", "AKVLG", "MKVLA"]


@pytest.mark.parametrize("mutation,match", [
    ("", r"mutation '' \(mutations\[0\]\) is empty"),
    ("K2R:", r"mutation 'K2R:' \(mutations\[0\]\): '' is not of the form A12G"),
    ("K2", r"'K2' is not of the form A12G"),
    ("k2r", r"'k2r' is not of the form A12G"),
    ("K2J", r"mutation 'K2J' \(mutations\[0\]\): unknown residue 'J'"),
    ("K9R", r"mutation 'K9R' \(mutations\[0\]\): position 9 is outside the wild type \(1..5\)"),
    ("K0R", r"position 0 is outside the wild type"),
    ("V2R", r"mutation 'V2R' \(mutations\[0\]\): the wild type has 'K' at position 2, not 'V'"),
    ("K2R:K2A", r"mutation 'K2R:K2A' \(mutations\[0\]\): position 2 is mutated twice"),
])
def test_bad_mutations_are_named(mutation, match):
  with pytest.raises(ValueError, match=match):
    mutations.parse_mutations("MKVLA", [mutation])


def test_bad_calls_are_named():
  with pytest.raises(ValueError, match="got the string 'K2R'"):
    mutations.parse_mutations("MKVLA", "K2R")
  with pytest.raises(ValueError, match=r"wild_type: invalid character 'J' .* column 3"):
    mutations.parse_mutations("MKJLA", ["K2R"])
  with pytest.raises(ValueError, match="method 'esm' is not one of"):
    mutations.score_mutations(exact_model, GRAPH, NOISE, WT, SINGLES, max_length=8,
                              method="esm")
  with pytest.raises(ValueError, match="wild_type has length 5 > max_length 4"):
    mutations.score_mutations(exact_model, GRAPH, NOISE, WT, SINGLES, max_length=4)
  with pytest.raises(ValueError, match="'masked_marginal' needs the absorbing graph"):
    mutations.score_mutations(exact_model, diffusion.Uniform(32), NOISE, WT, SINGLES,
                              max_length=8, method="masked_marginal")


def test_elbo_ranks_single_mutants_as_the_exact_likelihood():
  """Default draws (16 antithetic): Spearman >= 0.9 with the exact log p0 ratios (seed 0, and
  the median over ten seeds >= 0.95: not one lucky seed); the errors are on average below 4
  of their standard errors (an SE from 8 antithetic pairs is rough)."""
  want = exact_delta(WT, SINGLES)
  assert np.min(np.diff(np.sort(want))) > 1e-3  # distinct exact values
  got = mutations.score_mutations(exact_model, GRAPH, NOISE, WT, SINGLES, max_length=8,
                                  pack=False)
  assert got.mutations == SINGLES and got.delta.shape == got.se.shape == (len(SINGLES),)
  assert spearman(got.delta, want) >= 0.9
  assert np.mean(np.abs(got.delta - want) / got.se) < 4
  rhos = [spearman(mutations.score_mutations(exact_model, GRAPH, NOISE, WT, SINGLES,
                                             max_length=8, pack=False, seed=s).delta, want)
          for s in range(1, 10)]
  assert np.median(rhos + [spearman(got.delta, want)]) >= 0.95, rhos


def test_elbo_multi_mutants_converge_to_the_exact_ratio_and_are_antisymmetric():
  """Double and triple mutants (a path of single steps): within 4 SE of the exact ratio with
  256 draws; scoring the variant's way back to the wild type negates delta."""
  multi = [f"{WT[0]}1{'A' if WT[0] != 'A' else 'G'}:{WT[3]}4{'V' if WT[3] != 'V' else 'L'}",
           f"{WT[1]}2{'L' if WT[1] != 'L' else 'G'}:{WT[2]}3{'G' if WT[2] != 'G' else 'V'}:"
           f"{WT[4]}5{'A' if WT[4] != 'A' else 'L'}"]
  want = exact_delta(WT, multi)
  got = mutations.score_mutations(exact_model, GRAPH, NOISE, WT, multi, max_length=8,
                                  num_samples=256, pack=False, seed=3)
  assert np.all(np.abs(got.delta - want) < 4 * got.se), (got.delta, want, got.se)
  for j, m in enumerate(multi):
    variant, back = reverse(WT, m)
    rev = mutations.score_mutations(exact_model, GRAPH, NOISE, variant, [back], max_length=8,
                                    num_samples=256, pack=False, seed=3)
    np.testing.assert_allclose(rev.delta, -got.delta[j], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rev.se, got.se[j], rtol=1e-5, atol=1e-5)


def test_masked_marginal_is_exact_for_single_mutants_with_the_exact_score():
  """p(v_i | x_-i) / p(wt_i | x_-i) = p(v) / p(wt); a double mutant gets the sum over its
  positions of the conditionals given the other three positions, by brute force; se = 0."""
  got = mutations.score_mutations(exact_model, GRAPH, NOISE, WT, SINGLES, max_length=8,
                                  method="masked_marginal")
  np.testing.assert_allclose(got.delta, exact_delta(WT, SINGLES), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got.se, 0.0)
  a, b = ("A" if WT[0] != "A" else "G"), ("V" if WT[3] != "V" else "L")
  double = f"{WT[0]}1{a}:{WT[3]}4{b}"
  context = np.array([all(s[i] == WT[i] for i in (1, 2, 4)) for s in STRINGS])

  def conditional(i, letter):
    return np.log(PROBS[context & np.array([s[i] == letter for s in STRINGS])].sum()
                  / PROBS[context].sum())

  want = conditional(0, a) - conditional(0, WT[0]) + conditional(3, b) - conditional(3, WT[3])
  got = mutations.score_mutations(exact_model, GRAPH, NOISE, WT, [double], max_length=8,
                                  method="masked_marginal")
  np.testing.assert_allclose(got.delta, [want], rtol=1e-4, atol=1e-4)


def test_ddit_scores_are_antisymmetric_and_do_not_depend_on_packing():
  """A random micro DDiT: packed rows (several variants per row) give the numbers of one
  variant per row, swapping wild type and variant negates delta (both methods), a synonymous
  variant scores 0."""
  model = randomize(DDiT(ddit_config(length=32, n_blocks=1), GRAPH.dim, True, nnx.Rngs(0)),
                    scale=0.1)
  wt = "MKVLAGHTRE"
  muts = ["K2R", "A5W", "M1A:T8S", "G6G"]
  kw = dict(max_length=32, num_samples=4, batch_size=3)
  packed = mutations.score_mutations(model, GRAPH, NOISE, wt, muts, **kw)
  alone = mutations.score_mutations(model, GRAPH, NOISE, wt, muts, pack=False, **kw)
  np.testing.assert_allclose(packed.delta, alone.delta, rtol=1e-4, atol=1e-4)
  assert packed.delta[3] == 0.0 and packed.se[3] == 0.0
  assert np.all(np.abs(packed.delta[:3]) > 1e-3)
  for method in ("elbo", "masked_marginal"):
    fwd = mutations.score_mutations(model, GRAPH, NOISE, wt, muts[:3], method=method, **kw)
    for j, m in enumerate(muts[:3]):
      variant, back = reverse(wt, m)
      rev = mutations.score_mutations(model, GRAPH, NOISE, variant, [back], method=method, **kw)
      np.testing.assert_allclose(rev.delta, -fwd.delta[j], rtol=1e-4, atol=1e-4)
