"""Conditional protein-ligand sampling: one track given the other (valid tokens, padding,
determinism, the given track conditions the sampled one) and classifier-free guidance (W = 1 is
the plain sampler, W = 0 the unconditional one, closed-form token frequencies for exact
scores, the configs that train both scores)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import LIGAND_TOKENS, PL_B as B, PL_LL as LL, PL_LP as LP  # the test sizes
from helpers import protein_ligand_batch as make_batch
from helpers import protein_ligand_config as tiny_cfg
from helpers import protein_ligand_model as make_model
from helpers import protein_ligand_sampling
from sedd_jax import diffusion
from sedd_jax.data.tokenizers import residue_mask
from sedd_jax.protein_ligand import conditional
from sedd_jax.sampling import sampler

CFG, PGRAPH, LGRAPH, NOISE = protein_ligand_sampling()  # one block, every mode
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
                        lengths=llen, allowed=conditional.allowed_tokens(LGRAPH.dim, (0, 1, 2, 3)),
                        pad_id=1)


def _ligands(model, protein, plen, llen, guidance, key=7):
  return np.asarray(conditional.sample_ligand_given_protein(
      jax.random.PRNGKey(key), model, CFG, protein, plen, llen, target_length=LL,
      guidance=guidance))


def test_guided_log_score_formula():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(2, 3, 5)) * 10, jnp.float32).at[:, :, 4].set(0.0)
  b = jnp.asarray(rng.normal(size=(2, 3, 5)) * 10, jnp.float32).at[:, :, 4].set(0.0)
  np.testing.assert_array_equal(conditional.guided_log_score(a, b, 1.0), a)  # bit for bit
  np.testing.assert_array_equal(conditional.guided_log_score(a, b, 0.0), b)
  np.testing.assert_allclose(conditional.guided_log_score(a, b, 3.0), 3 * a - 2 * b, rtol=1e-6)
  assert np.all(np.asarray(conditional.guided_log_score(a, b, 2.5))[:, :, 4] == 0.0)  # zero kept
  with pytest.raises(ValueError, match="shape"):
    conditional.guided_log_score(a, b[:, :2], 2.0)


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
  assert conditional.context_drop(CFG, "ligand_given_protein") == 0.5  # `all`, uniform weights
  cfg = tiny_cfg("all", frozen=False)
  cfg.mode_weights = (0.0, 3.0, 6.0, 0.0, 1.0)
  assert conditional.context_drop(cfg, "ligand_given_protein") == pytest.approx(1 / 3)
  assert np.isnan(conditional.context_drop(cfg, "protein_given_ligand"))  # neither score trained
  assert conditional.context_drop(tiny_cfg("ligand_given_protein"), "ligand_given_protein") == 0.0
  assert conditional.context_drop(tiny_cfg("ligand_only"), "ligand_given_protein") == 1.0
  batch = make_batch()
  for bad in (tiny_cfg("protein_given_ligand"), cfg):
    with pytest.raises(ValueError, match="does not train both"):
      conditional.sample_protein_given_ligand(jax.random.PRNGKey(0), None, bad,
                                              batch["ligand_tokens"], batch["ligand_lengths"],
                                              batch["lengths"], guidance=2.0)


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
    return jnp.exp(conditional.guided_log_score(cond(x, sigma), alone(x, sigma), w))

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


def test_ligand_given_protein_sampling(model):
  cfg = CFG
  batch = make_batch()
  protein = jnp.asarray(batch["tokens"])
  protein_copy = np.asarray(protein).copy()
  lengths = np.array([10, 4, 1, 7], np.int32)
  key = jax.random.PRNGKey(3)
  lig = conditional.sample_ligand_given_protein(key, model, cfg, protein, batch["lengths"],
                                                lengths, target_length=LL)
  lig = np.asarray(lig)
  assert lig.shape == (B, LL) and lig.dtype == np.int32
  real = np.arange(LL) < lengths[:, None]
  assert np.all((lig[real] >= 4) & (lig[real] < LIGAND_TOKENS)), lig  # no mask, no specials
  assert np.all(lig[~real] == 1)  # <pad>
  np.testing.assert_array_equal(np.asarray(protein), protein_copy)  # the protein stays as given
  same = conditional.sample_ligand_given_protein(key, model, cfg, protein, batch["lengths"],
                                                 lengths, target_length=LL)
  np.testing.assert_array_equal(np.asarray(same), lig)  # deterministic in the key
  # The protein conditions the ligand: another protein gives other ligands for the same key.
  other = conditional.sample_ligand_given_protein(key, model, cfg, protein[::-1],
                                                  batch["lengths"][::-1], lengths,
                                                  target_length=LL)
  assert not np.array_equal(np.asarray(other), lig)
  with pytest.raises(ValueError, match="target_lengths"):
    conditional.sample_ligand_given_protein(key, model, cfg, protein, batch["lengths"],
                                            np.array([0, 1, 1, 1]), target_length=LL)


def test_protein_given_ligand_sampling(model):
  cfg = CFG
  batch = make_batch()
  lengths = np.array([16, 3, 8, 12], np.int32)
  prot = np.asarray(conditional.sample_protein_given_ligand(
      jax.random.PRNGKey(0), model, cfg, batch["ligand_tokens"], batch["ligand_lengths"],
      lengths, target_length=LP))
  real = np.arange(LP) < lengths[:, None]
  assert prot.shape == (B, LP)
  # The one residue rule of every protein sampler (tokenizers.residue_mask): the 20 standard
  # amino acids only; this random model emits X B U Z O under a looser rule.
  standard = np.flatnonzero(residue_mask(33))
  assert np.isin(prot[real], standard).all(), prot
  assert np.all(prot[~real] == 1)


# A memorised conditional: every ligand is one token repeated, MODE_TOKENS[k] with probability
# w_k (per protein below; the ligand-alone law is uniform over the four). The exact score at a
# masked position: the posterior over the modes that fit the revealed tokens, / expm1(sigma).
MODE_TOKENS = np.array([4, 5, 6, 7])
W_GIVEN = {5: (0.7, 0.3, 0.0, 0.0), 9: (0.3, 0.7, 0.0, 0.0)}  # protein's first residue -> w
W_ALONE = (0.25, 0.25, 0.25, 0.25)
LOG_ZERO = -1e4  # log of a zero probability (finite, so that guided_log_score stays finite)


def _modes_log_score(x, sigma, lengths, weights):
  """(B, L) ligands, (B,), (B,), (B, 4) mode weights -> (B, L, D) exact log score."""
  mask = LGRAPH.mask
  revealed = (x != mask) & (jnp.arange(x.shape[1])[None, :] < lengths[:, None])
  tokens = jnp.asarray(MODE_TOKENS)
  fits = jnp.all(~revealed[:, :, None] | (x[:, :, None] == tokens), axis=1)  # (B, 4)
  post = weights * fits
  post = post / post.sum(-1, keepdims=True)
  p = jnp.zeros((x.shape[0], LGRAPH.dim)).at[:, tokens].set(post)  # (B, D)
  cols = jnp.where(p > 0, jnp.log(jnp.maximum(p, 1e-30)), LOG_ZERO)
  cols = (cols - jnp.log(jnp.expm1(sigma))[:, None]).at[:, mask].set(0.0)
  return jnp.where((x == mask)[..., None], cols[:, None, :], 0.0)


class _ModesModel(nnx.Module):
  """Stands in for ProteinLigandDDiT in the conditional sampler: the exact ligand log scores,
  given the protein (its first residue picks W_GIVEN) or alone (W_ALONE)."""

  def __call__(self, protein, ligand, sigma_p, sigma_l, plen, llen, *, tracks="both",
               heads=None):
    if protein is None:
      weights = jnp.broadcast_to(jnp.asarray(W_ALONE), (ligand.shape[0], 4))
    else:
      weights = jnp.where((protein[:, :1] == 5), jnp.asarray(W_GIVEN[5]), jnp.asarray(W_GIVEN[9]))
    return None, _modes_log_score(ligand, sigma_l, llen, weights)


def test_first_hitting_draws_whole_memorised_ligands_with_guided_shares():
  """Issue 19: the analytic predictor reveals several tokens per step, each from the mixture of
  the modes, so its ligands are chimeras of memorised ones; first_hitting reveals one token per
  model call: only whole memorised ligands, mode k of protein c with probability
  w_ck^W u_k^(1-W) / Z (W = 1: the conditional law; W = 2: 0.49 / 0.58 = 0.845), and at
  temperature T that raised to 1/T (W = 2, T = 1/2: 0.2401 / 0.2482 = 0.967)."""
  n, length = 2000, 6
  protein = np.full((n, LP), 9, np.int32)
  protein[: n // 2, 0] = 5
  plen, llen = np.full((n,), LP, np.int32), np.full((n,), length, np.int32)
  model = _ModesModel()
  for w, t in ((1.0, 1.0), (2.0, 1.0), (2.0, 0.5)):
    x = np.asarray(conditional.sample_ligand_given_protein(
        jax.random.PRNGKey(int(w / t)), model, CFG, protein, plen, llen, target_length=length,
        predictor="first_hitting", guidance=w, temperature=t))
    assert np.all(x == x[:, :1]), x[np.any(x != x[:, :1], axis=1)][:3]  # no chimera
    for rows, first in ((slice(0, n // 2), 5), (slice(n // 2, n), 9)):
      want = (np.asarray(W_GIVEN[first]) ** w * np.asarray(W_ALONE) ** (1 - w)) ** (1 / t)
      freq = np.bincount(x[rows, 0], minlength=8)[MODE_TOKENS] / (n // 2)
      np.testing.assert_allclose(freq, want / want.sum(), atol=4.5 * np.sqrt(0.25 / (n // 2)),
                                 err_msg=f"W={w} T={t} protein {first}")
  x = np.asarray(conditional.sample_ligand_given_protein(
      jax.random.PRNGKey(0), model, CFG, protein, plen, llen, target_length=length,
      predictor="analytic", steps=2))
  assert np.mean(np.any(x != x[:, :1], axis=1)) > 0.3  # the analytic sampler's chimeras
