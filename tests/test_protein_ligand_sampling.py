"""Protein-ligand sampling beyond the plain conditional sampler: classifier-free guidance (W = 1
is today's sampler, W = 0 the unconditional one, closed-form token frequencies for exact
scores), joint protein+ligand sampling from noise (exact pair statistics for an exact score)
and the SMILES checker choice (RDKit / grammar fallback)."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import LIGAND_TOKENS, PL_B as B, PL_LL as LL, PL_LP as LP  # the test sizes
from helpers import protein_ligand_batch as make_batch
from helpers import protein_ligand_config as tiny_cfg
from helpers import protein_ligand_model as make_model
from sedd_jax import diffusion
from sedd_jax.protein_ligand import joint
from sedd_jax.protein_ligand import modes
from sedd_jax.protein_ligand import smiles as smiles_lib
from sedd_jax.sampling import sampler
# The modes tests' tiny config with one block (half the compile time).
CFG = tiny_cfg("all", n_blocks=1)
PGRAPH, LGRAPH = diffusion.Absorbing(32), diffusion.Absorbing(LIGAND_TOKENS)
NOISE = diffusion.get_noise(CFG.noise)
STEPS = int(CFG.sampling.steps)


@pytest.fixture(scope="module")
def model():
  return make_model(CFG)


@nnx.jit
def _reference_ligands(model, key, protein, plen, llen):
  """The conditional sampler as it was before guidance, spelled out with `sampler.sample`."""
  zeros = jnp.zeros((B,), jnp.float32)

  def score_fn(x, sigma, lengths=None):
    _, out = model(protein, x, zeros, sigma, plen, lengths, heads=("ligand",))
    return jnp.exp(out.astype(jnp.float32))

  return sampler.sample(key, score_fn, LGRAPH, NOISE, (B, LL), steps=STEPS,
                        predictor=CFG.sampling.predictor, eps=float(CFG.sampling.eps),
                        lengths=llen, allowed=modes.allowed_tokens(LGRAPH.dim, (0, 1, 2, 3)),
                        pad_id=1)


def _ligands(model, protein, plen, llen, guidance, key=7):
  return np.asarray(modes.sample_ligand_given_protein(
      jax.random.PRNGKey(key), model, CFG, protein, plen, llen, target_length=LL,
      guidance=guidance))


def test_guided_log_score_formula():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(2, 3, 5)) * 10, jnp.float32).at[:, :, 4].set(0.0)
  b = jnp.asarray(rng.normal(size=(2, 3, 5)) * 10, jnp.float32).at[:, :, 4].set(0.0)
  np.testing.assert_array_equal(modes.guided_log_score(a, b, 1.0), a)  # bit for bit
  np.testing.assert_array_equal(modes.guided_log_score(a, b, 0.0), b)
  np.testing.assert_allclose(modes.guided_log_score(a, b, 3.0), 3 * a - 2 * b, rtol=1e-6)
  assert np.all(np.asarray(modes.guided_log_score(a, b, 2.5))[:, :, 4] == 0.0)  # zero kept
  with pytest.raises(ValueError, match="shape"):
    modes.guided_log_score(a, b[:, :2], 2.0)


def test_guidance_one_is_todays_sampler_and_zero_ignores_the_protein(model):
  batch = make_batch()
  protein, plen = jnp.asarray(batch["tokens"]), jnp.asarray(batch["lengths"])
  llen = jnp.asarray([10, 4, 1, 7], jnp.int32)
  key = jax.random.PRNGKey(7)
  w1 = _ligands(model, protein, plen, llen, 1.0)
  np.testing.assert_array_equal(w1, _reference_ligands(model, key, protein, plen, llen))
  # W = 0: the ligand-alone score only: the same draws whatever the protein (at W = 1 the
  # protein matters: test_protein_ligand_modes.test_ligand_given_protein_sampling).
  w0 = _ligands(model, protein, plen, llen, 0.0)
  np.testing.assert_array_equal(_ligands(model, protein[::-1], plen[::-1], llen, 0.0), w0)
  assert not np.array_equal(w0, w1)
  w3 = _ligands(model, protein, plen, llen, 3.0)  # same compiled program as W = 0
  real = np.arange(LL) < np.asarray(llen)[:, None]
  assert np.all((w3[real] >= 4) & (w3[real] < LIGAND_TOKENS)) and np.all(w3[~real] == 1)


def test_guidance_needs_both_scores_trained():
  assert modes.context_drop(CFG, "ligand_given_protein") == 0.5  # `all`, uniform weights
  cfg = tiny_cfg("all", frozen=False)
  cfg.mode_weights = (0.0, 3.0, 6.0, 0.0, 1.0)
  assert modes.context_drop(cfg, "ligand_given_protein") == pytest.approx(1 / 3)
  assert np.isnan(modes.context_drop(cfg, "protein_given_ligand"))  # neither score trained
  assert modes.context_drop(tiny_cfg("ligand_given_protein"), "ligand_given_protein") == 0.0
  assert modes.context_drop(tiny_cfg("ligand_only"), "ligand_given_protein") == 1.0
  batch = make_batch()
  for bad in (tiny_cfg("protein_given_ligand"), cfg):
    with pytest.raises(ValueError, match="does not train both"):
      modes.sample_protein_given_ligand(jax.random.PRNGKey(0), None, bad, batch["ligand_tokens"],
                                        batch["ligand_lengths"], batch["lengths"], guidance=2.0)


# Exact scores: a masked position of an absorbing graph has score p(j | rest) / expm1(sigma).
P_COND = np.array([0.4, 0.3, 0.2, 0.1])  # p(token | context)
P_ALONE = np.full(4, 0.25)  # p(token)


def _exact_log_score(probs):
  """log score of independent positions with token law `probs` (D - 1,): (x, sigma) -> (B, L, D)
  (0 at the mask column and everywhere at unmasked positions: the model's zero at the input)."""
  log_p = jnp.log(jnp.asarray(probs, jnp.float32))

  def fn(x, sigma):
    masked = (x == len(probs))[..., None]
    cols = log_p[None, None, :] - jnp.log(jnp.expm1(sigma))[:, None, None]
    cols = jnp.concatenate([cols, jnp.zeros(cols.shape[:2] + (1,))], axis=-1)
    return jnp.where(masked, jnp.broadcast_to(cols, x.shape + (len(probs) + 1,)), 0.0)

  return fn


@jax.jit
def _guided_draws(key, w):
  cond, alone = _exact_log_score(P_COND), _exact_log_score(P_ALONE)

  def score_fn(x, sigma):
    return jnp.exp(modes.guided_log_score(cond(x, sigma), alone(x, sigma), w))

  return sampler.sample(key, score_fn, diffusion.Absorbing(4), NOISE, (1000, 8), steps=16)


def test_guidance_moves_exact_samples_to_the_closed_form():
  """Guided by W, each token is drawn with probability p(j|c)^W p(j)^(1-W) / Z: the share of the
  token the context favours grows with W (0.25, 0.4, 0.53, 0.72 for W = 0, 1, 2, 4)."""
  shares = []
  for w in (0.0, 1.0, 2.0, 4.0):
    x = np.asarray(_guided_draws(jax.random.PRNGKey(int(w)), jnp.float32(w)))
    want = P_COND ** w * P_ALONE ** (1 - w)
    want /= want.sum()
    freq = np.bincount(x.ravel(), minlength=5) / x.size
    assert freq[4] == 0.0  # no mask left
    n = x.size
    np.testing.assert_allclose(freq[:4], want, atol=4.5 * np.sqrt(0.25 / n), err_msg=f"W={w}")
    shares.append(freq[0])
  assert shares == sorted(shares) and shares[-1] - shares[1] > 0.25, shares


# ----------------------------------------------------------------------------------------------
# Joint sampling.


def test_combined_vocabulary_round_trip():
  rng = np.random.default_rng(1)
  p = jnp.asarray(rng.integers(0, 33, (3, 5)), jnp.int32)
  lig = jnp.asarray(rng.integers(0, LIGAND_TOKENS + 1, (3, 4)), jnp.int32)
  x = joint.to_combined(p, lig, 33, LIGAND_TOKENS + 1)
  mask = 32 + LIGAND_TOKENS
  assert joint.combined_graph(PGRAPH, LGRAPH).dim == mask + 1
  assert np.all((np.asarray(x[:, :5]) < 32) | (np.asarray(x[:, :5]) == mask))
  assert np.all(np.asarray(x[:, 5:]) >= 32)  # ligand ids after the 32 protein ids
  back_p, back_l = joint.from_combined(x, 5, 33, LIGAND_TOKENS + 1)
  np.testing.assert_array_equal(back_p, p)
  np.testing.assert_array_equal(back_l, lig)
  score = joint.combined_score(jnp.zeros((3, 5, 33)), jnp.zeros((3, 4, LIGAND_TOKENS + 1)))
  assert score.shape == (3, 9, mask + 1)
  assert np.all(score[:, :5, 32:mask] == 0) and np.all(score[:, 5:, :32] == 0)
  assert np.all(score[:, :, mask] == 1) and np.all(score[:, :5, :32] == 1)
  with pytest.raises(ValueError, match="absorbing"):
    joint.combined_graph(diffusion.Uniform(32), LGRAPH)


# Exact joint law of one residue and one ligand token: residue uniform on 4 letters, the ligand
# token a function of it.
RESIDUES = np.array([5, 9, 14, 20])
LIGAND_OF = {5: 30, 9: 7, 14: 12, 20: 22}


def _exact_pair_log_score(xp, xl, sigma):
  """Exact log scores of the pair law for (B, 1) protein and ligand tokens at noise sigma."""
  pmask, lmask = xp[:, 0] == PGRAPH.mask, xl[:, 0] == LGRAPH.mask
  inv = -jnp.log(jnp.expm1(sigma))  # (B,)
  # Protein given the ligand: uniform over RESIDUES if the ligand is masked, else its residue.
  res = jnp.asarray(RESIDUES)
  lig_of = jnp.asarray([LIGAND_OF[int(r)] for r in RESIDUES])
  p_prob = jnp.where(lmask[:, None], 0.25, (lig_of[None, :] == xl).astype(jnp.float32))  # (B, 4)
  log_p = jnp.full((xp.shape[0], PGRAPH.dim), -jnp.inf).at[:, res].set(jnp.log(p_prob))
  log_p = (log_p + inv[:, None]).at[:, -1].set(0.0)
  l_prob = jnp.where(pmask[:, None], 0.25, (res[None, :] == xp).astype(jnp.float32))
  log_l = jnp.full((xl.shape[0], LGRAPH.dim), -jnp.inf).at[:, lig_of].set(jnp.log(l_prob))
  log_l = (log_l + inv[:, None]).at[:, -1].set(0.0)
  log_p = jnp.where(pmask[:, None], log_p, 0.0)  # unmasked positions: the zero at the input
  log_l = jnp.where(lmask[:, None], log_l, 0.0)
  return log_p[:, None, :], log_l[:, None, :]


def test_joint_sampler_draws_the_exact_pair_law():
  n = 2000
  ones = jnp.ones((n,), jnp.int32)
  run = jax.jit(lambda key: joint.sample_joint_scores(
      key, _exact_pair_log_score, PGRAPH, LGRAPH, NOISE, ones, ones, 1, 1, steps=64))
  p, lig = (np.asarray(a)[:, 0] for a in run(jax.random.PRNGKey(0)))
  assert set(p) <= set(RESIDUES.tolist())
  # Pairs agree unless both tracks unmask in the same step (then each is drawn from its
  # marginal): about 1/64 of the pairs times 3/4.
  agree = np.mean([LIGAND_OF[a] == b for a, b in zip(p, lig)])
  assert agree > 0.97, agree
  np.testing.assert_allclose(np.bincount(p, minlength=33)[RESIDUES] / n, 0.25, atol=0.045)


def test_joint_sampling_with_the_model(model):
  plen = np.array([16, 3, 8, 12], np.int32)
  llen = np.array([10, 4, 1, 7], np.int32)
  key = jax.random.PRNGKey(0)
  p, lig = (np.asarray(a) for a in joint.sample_joint(
      key, model, CFG, plen, llen, protein_length=LP, ligand_length=LL))
  assert p.shape == (B, LP) and lig.shape == (B, LL)
  real_p, real_l = np.arange(LP) < plen[:, None], np.arange(LL) < llen[:, None]
  assert np.all((p[real_p] >= 4) & (p[real_p] <= 28)) and np.all(p[~real_p] == 1)
  assert np.all((lig[real_l] >= 4) & (lig[real_l] < LIGAND_TOKENS)) and np.all(lig[~real_l] == 1)
  again = joint.sample_joint(key, model, CFG, plen, llen, protein_length=LP, ligand_length=LL)
  np.testing.assert_array_equal(np.asarray(again[0]), p)
  np.testing.assert_array_equal(np.asarray(again[1]), lig)
  with pytest.raises(ValueError, match=r"ligand_lengths must lie in \[1, 10\]"):
    joint.sample_joint(key, model, CFG, plen, llen + 5, protein_length=LP, ligand_length=LL)


# ----------------------------------------------------------------------------------------------
# SMILES checker: RDKit (the `chem` extra) or the grammar fallback.

# Grammatical SMILES that are not molecules: pentavalent carbon, a 5-ring of aromatic carbons.
GRAMMATICAL_NOT_CHEMICAL = ["C(C)(C)(C)(C)C", "c1cccc1"]
VALID = ["CCO", "c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O"]


def test_rdkit_is_used_when_installed():
  pytest.importorskip("rdkit")  # an optional extra: `pip install -e '.[chem]'` (in `.[test]`)
  report = smiles_lib.validity_report(VALID + GRAMMATICAL_NOT_CHEMICAL + ["C(C"])
  assert report["checker"] == "rdkit"
  assert report["valid"] == [True, True, True, False, False, False]
  assert report["num_valid"] == 3 and report["validity"] == 0.5
  assert all(smiles_lib.grammar_valid_smiles(s) for s in GRAMMATICAL_NOT_CHEMICAL)


def test_grammar_fallback_without_rdkit(monkeypatch):
  monkeypatch.setitem(sys.modules, "rdkit", None)  # `import rdkit` raises ImportError
  report = smiles_lib.validity_report(VALID + GRAMMATICAL_NOT_CHEMICAL + ["C(C"])
  assert report["checker"] == "grammar"
  assert report["valid"] == [True] * 5 + [False]
  with pytest.raises(ImportError, match="chem"):
    smiles_lib.validity_checker("rdkit")
  assert smiles_lib.validity_report([]) == {"checker": "grammar", "num": 0, "num_valid": 0,
                                       "validity": 0.0, "valid": []}
