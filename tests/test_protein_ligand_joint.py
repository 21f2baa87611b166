"""Joint protein + ligand sampling from noise: the combined vocabulary round trip, the exact
pair law for an exact score, and the model sampler's tokens, padding and length checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import LIGAND_TOKENS, PL_B as B, PL_LL as LL, PL_LP as LP  # the test sizes
from helpers import protein_ligand_model, protein_ligand_sampling
from sedd_jax import diffusion
from sedd_jax.protein_ligand import joint

CFG, PGRAPH, LGRAPH, NOISE = protein_ligand_sampling()  # one block, every mode


@pytest.fixture(scope="module")
def model():
  return protein_ligand_model(CFG)


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


@pytest.mark.parametrize("predictor", ["analytic", "first_hitting"])
def test_joint_sampler_draws_the_exact_pair_law(predictor):
  n = 2000
  ones = jnp.ones((n,), jnp.int32)
  run = jax.jit(lambda key: joint.sample_joint_scores(
      key, _exact_pair_log_score, PGRAPH, LGRAPH, NOISE, ones, ones, 1, 1, steps=64,
      predictor=predictor))
  p, lig = (np.asarray(a)[:, 0] for a in run(jax.random.PRNGKey(0)))
  assert set(p) <= set(RESIDUES.tolist())
  # analytic: pairs agree unless both tracks unmask in the same step (then each is drawn from
  # its marginal): about 1/64 of the pairs times 3/4. first_hitting reveals one token of the
  # pair per model call (one clock for both tracks): always the exact law.
  agree = np.mean([LIGAND_OF[a] == b for a, b in zip(p, lig)])
  assert agree == 1.0 if predictor == "first_hitting" else 0.97 < agree < 1.0, agree
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
  # first_hitting: the same token and padding rules.
  p, lig = (np.asarray(a) for a in joint.sample_joint(
      key, model, CFG, plen, llen, protein_length=LP, ligand_length=LL,
      predictor="first_hitting"))
  assert np.all((p[real_p] >= 4) & (p[real_p] <= 28)) and np.all(p[~real_p] == 1)
  assert np.all((lig[real_l] >= 4) & (lig[real_l] < LIGAND_TOKENS)) and np.all(lig[~real_l] == 1)
  with pytest.raises(ValueError, match=r"ligand_lengths must lie in \[1, 10\]"):
    joint.sample_joint(key, model, CFG, plen, llen + 5, protein_length=LP, ligand_length=LL)
