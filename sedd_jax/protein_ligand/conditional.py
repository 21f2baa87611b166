"""Conditional sampling of the protein-ligand model: one track given the other (clean, sigma 0),
with classifier-free guidance (`guided_log_score`), by `sedd_jax.sampling.sampler.sample`.

Guidance needs both the conditional and the unconditional score of the sampled track trained:
`context_drop(cfg, task)` says how often the training modes (`protein_ligand.modes`) drop the
context. Joint sampling of both tracks from noise: `sedd_jax.protein_ligand.joint`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sedd_jax import diffusion
from sedd_jax.data.tokenizers import residue_mask
from sedd_jax.protein_ligand.model import get_graphs
from sedd_jax.protein_ligand.model import ProteinLigandDDiT
from sedd_jax.protein_ligand.modes import ALL
from sedd_jax.protein_ligand.modes import check_mode
from sedd_jax.protein_ligand.modes import MODES
from sedd_jax.sampling import sampler

Array = jax.Array

SAMPLING_TASKS = ("ligand_given_protein", "protein_given_ligand")
# SMILES specials <cls> <pad> <eos> <unk> (ids 0..3 of SmilesTokenizer): never sampled.
LIGAND_FORBIDDEN = (0, 1, 2, 3)
PAD_ID = 1  # <pad> in both tokenizers


def allowed_tokens(dim: int, forbidden: Sequence[int]) -> Array:
  """(D,) bool: every token but `forbidden` (the mask column is kept by the sampler)."""
  return jnp.ones((dim,), bool).at[jnp.asarray(forbidden, jnp.int32)].set(False)


def _allowed(task: str, pgraph: diffusion.Graph, lgraph: diffusion.Graph) -> Array:
  """(D,) bool of the sampled track: proteins the residues of `residue_mask` (the
  rule of every protein sampler), ligands every token but the SMILES specials (the mask column
  is kept by the sampler)."""
  if task == "ligand_given_protein":
    return allowed_tokens(lgraph.dim, LIGAND_FORBIDDEN)
  return jnp.asarray(residue_mask(pgraph.dim))


def guided_log_score(log_cond: Array, log_uncond: Array, guidance: Array | float) -> Array:
  """Classifier-free guidance on log scores: log s_W = W log s_cond + (1 - W) log s_uncond.

  Where: inside the conditional sampler's score function, on the two model outputs (LOG
  scores), before `exp` and before the sampler zeroes the disallowed tokens; position by
  position, over every column. Columns where both inputs are 0 stay 0: the zero the model
  writes at the input token (the mask column at a masked position) keeps. As rates are scores
  times the forward rate, this is guidance of the reverse rates, R_W = R_cond^W R_uncond^(1-W)
  (Nisonoff et al. 2024), not renormalised. For the true scores of an absorbing graph at a
  masked position, s(j) = p(j | rest) / expm1(sigma), so a position unmasks to j with
  probability proportional to p(j | context)^W p(j)^(1 - W) (its unmasking rate scales with
  the sum of those terms): W = 1 is the conditional model, W = 0 the unconditional one, W > 1
  sharpens towards the tokens that the context makes likelier than they are on their own (and,
  as any such guidance, lifts a token that both scores find unlikely if the unconditional one
  finds it even less likely: p_c^W / p_u^(W - 1)).

  Args:
    log_cond: (B, L, D) log score given the context.
    log_uncond: (B, L, D) log score without it (the `*_only` mode of the same track).
    guidance: W, a scalar (may be traced).

  Returns:
    (B, L, D) float32 guided log score (`log_cond` itself, bit for bit, at W = 1).
  """
  if jnp.shape(log_cond) != jnp.shape(log_uncond):
    raise ValueError(f"conditional and unconditional log scores differ in shape: "
                     f"{jnp.shape(log_cond)} vs {jnp.shape(log_uncond)}")
  w = jnp.asarray(guidance, jnp.float32)
  return w * log_cond.astype(jnp.float32) + (1.0 - w) * log_uncond.astype(jnp.float32)


def context_drop(cfg, task: str) -> float:
  """Probability that the context is dropped when `task`'s sampled track is trained alone or
  given its clean partner: w_only / (w_only + w_given) of `cfg.mode_weights` for mode `all`
  (the track's `*_only` mode and `task`; uniform weights: 0.5), 0 for the fixed mode `task`,
  1 for the fixed `*_only` mode, NaN when neither is trained.

  Classifier-free guidance needs both scores trained: 0 < context_drop < 1.
  """
  if task not in SAMPLING_TASKS:
    raise ValueError(f"task = {task!r}; choose one of {SAMPLING_TASKS}")
  only = "ligand_only" if task == "ligand_given_protein" else "protein_only"
  mode = check_mode(cfg)
  if mode != ALL:
    return 1.0 if mode == only else 0.0 if mode == task else float("nan")
  weights = tuple(cfg.get("mode_weights", ()) or ()) or (1.0,) * len(MODES)
  w_only, w_given = weights[MODES.index(only)], weights[MODES.index(task)]
  return float(w_only / (w_only + w_given)) if w_only + w_given > 0 else float("nan")


def _check_guidance(cfg, task: str, guidance: float) -> float:
  """W as a float; a ValueError naming cfg.mode/cfg.mode_weights when W != 1 needs a score
  that the config never trained."""
  guidance = float(guidance)
  if not np.isfinite(guidance):
    raise ValueError(f"guidance = {guidance} must be a finite number")
  if guidance != 1.0:
    drop = context_drop(cfg, task)
    if not 0.0 < drop < 1.0:
      raise ValueError(
          f"guidance {guidance:g} mixes the {task} score with the unconditional one, but "
          f"cfg.mode = {cfg.mode!r} (mode_weights = {tuple(cfg.get('mode_weights', ()) or ())}) "
          f"does not train both (context drop probability {drop}); train with mode 'all' and "
          f"positive weights for {task} and its *_only mode")
  return guidance


@functools.partial(nnx.jit, static_argnames=("task", "target_length", "steps", "predictor",
                                             "eps", "pgraph", "lgraph", "noise", "guided",
                                             "temperature", "reveal_order"))
def _sample_jit(model, key, given, given_lengths, target_lengths, guidance, *, task,
                target_length, steps, predictor, eps, pgraph, lgraph, noise, guided,
                temperature, reveal_order):
  """The conditional reverse process (`sedd_jax.sampling.sampler.sample`), model as input;
  with `guided`, the score is `guided_log_score` of the conditional and the unconditional
  (the sampled track alone, `tracks=`) log scores with weight `guidance` (traced)."""
  b = given.shape[0]
  zeros_b = jnp.zeros((b,), jnp.float32)
  if task == "ligand_given_protein":
    graph, track = lgraph, "ligand"
  else:
    graph, track = pgraph, "protein"

  def score_fn(x, sigma, lengths=None):
    """x (B, Lt), sigma (B,) -> exp(log score) (B, Lt, Dt) of the sampled track, given clean."""
    del lengths  # target_lengths, closed over
    if task == "ligand_given_protein":
      _, out = model(given, x, zeros_b, sigma, given_lengths, target_lengths, heads=("ligand",))
      if guided:
        _, alone = model(None, x, None, sigma, None, target_lengths, tracks=track)
    else:
      out, _ = model(x, given, sigma, zeros_b, target_lengths, given_lengths, heads=("protein",))
      if guided:
        alone, _ = model(x, None, sigma, None, target_lengths, None, tracks=track)
    if guided:
      out = guided_log_score(out, alone, guidance)
    return jnp.exp(out.astype(jnp.float32))

  return sampler.sample(key, score_fn, graph, noise, (b, target_length), steps=steps,
                        predictor=predictor, eps=eps, lengths=target_lengths,
                        allowed=_allowed(task, pgraph, lgraph), pad_id=PAD_ID,
                        temperature=temperature, reveal_order=reveal_order)


def sample_conditional(key: Array, model: ProteinLigandDDiT, cfg, task: str,
                       given_tokens: Array, given_lengths: Array, target_lengths: Array, *,
                       target_length: int | None = None, steps: int | None = None,
                       predictor: str | None = None, eps: float | None = None,
                       guidance: float = 1.0, temperature: float = 1.0,
                       reveal_order: str = "random") -> Array:
  """Samples one track given the other (clean, sigma 0) with `sedd_jax.sampling.sampler.sample`:
  `analytic` / `euler` steps in one `lax.fori_loop` and a final denoise step, or `first_hitting`
  (absorbing graph): one model call per revealed token, so tokens revealed together never come
  from different modes of a sharply multimodal (memorised) conditional.

  With `guidance` W != 1, classifier-free guidance: every step mixes the conditional log score
  with the unconditional one (the track alone, as its `*_only` mode trains it) by
  `guided_log_score`, before exponentiation; two model calls per step. W = 1 (the default) is
  the plain conditional sampler: one call per step, the same draws for the same key. W != 1
  needs a config that trained both scores (`context_drop` strictly between 0 and 1). With
  `first_hitting` the guided score only picks the revealed token (the reveal times do not depend
  on the model): p(j | context)^W p(j)^(1 - W) / Z for exact scores, the analytic closed form.

  Args:
    key: PRNG key.
    model: the dual-track model (switched to eval mode here).
    cfg: the protein-ligand config (sampling.steps/predictor/eps are the defaults;
      `sampler.resolve_options`).
    task: `ligand_given_protein` or `protein_given_ligand`.
    given_tokens: (B, Lg) int clean tokens of the given track (padded after `given_lengths`).
    given_lengths: (B,) int lengths of the given sequences.
    target_lengths: (B,) int number of tokens to generate per example (>= 1).
    target_length: padded length of the output (default: cfg.ligand.length or cfg.model.length,
      at least max(target_lengths)).
    guidance: W of `guided_log_score` (1 = no guidance).
    temperature: T of `sampler.tempered_score`, applied after guidance (1 = the model's own
      conditional; T < 1 concentrates each revealed token on its mode).
    reveal_order: "random" or "confidence" (first_hitting; `sedd_jax.sampling.first_hitting`).

  Returns:
    (B, target_length) int32 tokens of the sampled track: never the mask nor a special/gap id,
    `<pad>` (1) at positions >= target_lengths. The given track is not touched.
  """
  if task not in SAMPLING_TASKS:
    raise ValueError(f"task = {task!r}; choose one of {SAMPLING_TASKS}")
  given_tokens = jnp.asarray(given_tokens, jnp.int32)
  given_lengths = jnp.asarray(given_lengths, jnp.int32)
  target_lengths = jnp.asarray(target_lengths, jnp.int32)
  b = given_tokens.shape[0]
  if given_tokens.ndim != 2 or given_lengths.shape != (b,) or target_lengths.shape != (b,):
    raise ValueError(f"given_tokens must be (B, L) with given_lengths and target_lengths (B,); "
                     f"got {given_tokens.shape}, {given_lengths.shape}, {target_lengths.shape}")
  if target_length is None:
    target_length = int(cfg.ligand.length if task == "ligand_given_protein" else cfg.model.length)
  pgraph, lgraph = get_graphs(cfg)
  noise = diffusion.get_noise(cfg.noise)
  steps, predictor, eps = sampler.resolve_options(
      lgraph if task == "ligand_given_protein" else pgraph, cfg.sampling, steps=steps,
      predictor=predictor, eps=eps, temperature=temperature, reveal_order=reveal_order)
  if int(jnp.max(target_lengths)) > target_length or int(jnp.min(target_lengths)) < 1:
    raise ValueError(f"target_lengths must lie in [1, target_length = {target_length}]")
  guidance = _check_guidance(cfg, task, guidance)
  model.eval()
  return _sample_jit(model, key, given_tokens, given_lengths, target_lengths,
                     jnp.float32(guidance), task=task, target_length=int(target_length),
                     steps=steps, predictor=predictor, eps=eps, pgraph=pgraph, lgraph=lgraph,
                     noise=noise, guided=guidance != 1.0, temperature=float(temperature),
                     reveal_order=reveal_order)


def sample_ligand_given_protein(key: Array, model: ProteinLigandDDiT, cfg, protein_tokens: Array,
                                protein_lengths: Array, ligand_lengths: Array,
                                **kwargs) -> Array:
  """Ligands for clean proteins: (B, Lp), (B,), (B,) -> (B, Ll) int32 SMILES ids (see
  `sample_conditional` for the keyword arguments)."""
  return sample_conditional(key, model, cfg, "ligand_given_protein", protein_tokens,
                            protein_lengths, ligand_lengths, **kwargs)


def sample_protein_given_ligand(key: Array, model: ProteinLigandDDiT, cfg, ligand_tokens: Array,
                                ligand_lengths: Array, protein_lengths: Array,
                                **kwargs) -> Array:
  """Proteins for clean ligands: (B, Ll), (B,), (B,) -> (B, Lp) int32 ESM-2 ids."""
  return sample_conditional(key, model, cfg, "protein_given_ligand", ligand_tokens,
                            ligand_lengths, protein_lengths, **kwargs)
