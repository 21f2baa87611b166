"""Joint sampling: a protein and a ligand generated together from noise (the `joint` mode).

Both tracks start fully masked and are denoised together by the protein sampler
(`sedd_jax.sampling.sampler.sample`: one `lax.fori_loop` of predictor steps, step i drawing from
`fold_in(key, i)`, final denoise step) run on the two tracks laid side by side:

- One sequence (B, Lp + Ll) over a combined absorbing vocabulary of D = (D_p - 1) + (D_l - 1)
  + 1 states: protein ids 0..D_p-2 as they are, ligand ids shifted by D_p - 1, one shared mask
  (the last id). `to_combined` / `from_combined` map the tracks in and out.
- The score of a protein position is the protein head's score on the protein columns and 0 on
  the ligand columns (and vice versa); the mask column is the track's own. For the absorbing
  graph a position then only ever unmasks to a token of its own track, unmasked tokens never
  change, and the per-position reverse step is the track's own: the combined chain is exactly
  the two tracks' reverse processes run in lockstep, each with its own graph and its own sigma
  input to the model. The `joint` mode trains both tracks at one t per example under the
  shared `cfg.noise`, so the two sigma inputs are sigma(t) of that one schedule.
- Padding: positions past a track's length are fixed to `<pad>` (`fixed_mask` of the sampler;
  the model never attends to them: keys past `*_lengths` are masked).
- `first_hitting` is exact here too: both tracks are masked at one sigma(t), so every masked
  position of the pair has the same reveal clock; the next reveal is uniform among the masked
  positions of both tracks and one model call serves both (max over the batch of the protein
  length plus the ligand length calls).

Only absorbing graphs (a uniform graph's limit would mix the two vocabularies).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sedd_jax import diffusion
from sedd_jax.data.tokenizers import residue_mask
from sedd_jax.protein_ligand import conditional
from sedd_jax.protein_ligand.model import ProteinLigandDDiT
from sedd_jax.protein_ligand.model import get_graphs
from sedd_jax.sampling import sampler

Array = jax.Array
LogScoreFn = Callable[[Array, Array, Array], tuple[Array, Array]]


def combined_graph(pgraph: diffusion.Graph, lgraph: diffusion.Graph) -> diffusion.Absorbing:
  """The absorbing graph over both vocabularies: (D_p - 1) + (D_l - 1) tokens + one mask."""
  if not (pgraph.absorb and lgraph.absorb):
    raise ValueError("joint sampling needs absorbing graphs (graph.type and ligand.graph.type "
                     "= 'absorb')")
  return diffusion.Absorbing(pgraph.dim - 1 + lgraph.dim - 1)


def to_combined(protein: Array, ligand: Array, pdim: int, ldim: int) -> Array:
  """(B, Lp) protein ids, (B, Ll) ligand ids (mask = D - 1 of each) -> (B, Lp + Ll) combined."""
  mask = pdim - 1 + ldim - 1
  p = jnp.where(protein == pdim - 1, mask, protein)
  lig = jnp.where(ligand == ldim - 1, mask, ligand + pdim - 1)
  return jnp.concatenate([p, lig], axis=1).astype(jnp.int32)


def from_combined(x: Array, lp: int, pdim: int, ldim: int) -> tuple[Array, Array]:
  """(B, Lp + Ll) combined ids -> ((B, Lp) protein ids, (B, Ll) ligand ids); inverse of
  `to_combined` (the combined mask becomes each track's mask)."""
  mask = pdim - 1 + ldim - 1
  p, lig = x[:, :lp], x[:, lp:]
  return (jnp.where(p == mask, pdim - 1, p).astype(jnp.int32),
          jnp.where(lig == mask, ldim - 1, lig - (pdim - 1)).astype(jnp.int32))


def combined_score(log_p: Array, log_l: Array) -> Array:
  """Track log scores (B, Lp, D_p), (B, Ll, D_l) -> exponentiated combined score
  (B, Lp + Ll, D_p - 1 + D_l - 1 + 1), 0 on the other track's columns."""
  sp, sl = jnp.exp(log_p.astype(jnp.float32)), jnp.exp(log_l.astype(jnp.float32))
  zp = jnp.zeros((*sp.shape[:2], sl.shape[-1] - 1), jnp.float32)
  zl = jnp.zeros((*sl.shape[:2], sp.shape[-1] - 1), jnp.float32)
  rows_p = jnp.concatenate([sp[..., :-1], zp, sp[..., -1:]], axis=-1)
  rows_l = jnp.concatenate([zl, sl[..., :-1], sl[..., -1:]], axis=-1)
  return jnp.concatenate([rows_p, rows_l], axis=1)


def sample_joint_scores(key: Array, log_score_fn: LogScoreFn, pgraph: diffusion.Graph,
                        lgraph: diffusion.Graph, noise: diffusion.Noise,
                        protein_lengths: Array, ligand_lengths: Array, lp: int, ll: int, *,
                        steps: int, predictor: str = "analytic", eps: float = 1e-5,
                        temperature: float = 1.0,
                        reveal_order: str = "random") -> tuple[Array, Array]:
  """The joint reverse process for any pair of track log scores (see the module docstring).

  Args:
    key: PRNG key (as `sampler.sample`'s).
    log_score_fn: (protein (B, Lp), ligand (B, Ll), sigma (B,)) -> (protein log score
      (B, Lp, D_p), ligand log score (B, Ll, D_l)), both tracks noised to sigma.
    pgraph, lgraph: the tracks' absorbing graphs.
    noise: the shared noise schedule.
    protein_lengths, ligand_lengths: (B,) int real lengths (>= 1).
    lp, ll: padded widths of the tracks.
    steps, predictor, eps, temperature, reveal_order: as `sampler.sample` (predictor analytic,
      euler or first_hitting); the temperature sharpens each revealed token within its own
      track.

  Returns:
    ((B, Lp) protein ids, (B, Ll) ligand ids), int32: residues 4..28 and SMILES tokens (no
    special id, no mask) before the lengths, `<pad>` (1) after.
  """
  graph = combined_graph(pgraph, lgraph)
  pdim, ldim = pgraph.dim, lgraph.dim
  b = protein_lengths.shape[0]
  if protein_lengths.shape != (b,) or ligand_lengths.shape != (b,):
    raise ValueError(f"protein_lengths and ligand_lengths must both be (B,); got "
                     f"{protein_lengths.shape}, {ligand_lengths.shape}")

  def score_fn(x, sigma):
    """Combined (B, Lp + Ll) tokens, sigma (B,) -> (B, Lp + Ll, D) score."""
    return combined_score(*log_score_fn(*from_combined(x, lp, pdim, ldim), sigma))

  allowed = jnp.concatenate([jnp.asarray(residue_mask(pdim))[:-1],
                             conditional.allowed_tokens(ldim, conditional.LIGAND_FORBIDDEN)[:-1],
                             jnp.ones((1,), bool)])
  padded = jnp.concatenate([jnp.arange(lp)[None, :] >= protein_lengths[:, None],
                            jnp.arange(ll)[None, :] >= ligand_lengths[:, None]], axis=1)
  pad = jnp.full((b, lp + ll), conditional.PAD_ID, jnp.int32)
  x = sampler.sample(key, score_fn, graph, noise, (b, lp + ll), steps=steps,
                     predictor=predictor, eps=eps, allowed=allowed,
                     fixed_tokens=to_combined(pad[:, :lp], pad[:, lp:], pdim, ldim),
                     fixed_mask=padded, temperature=temperature, reveal_order=reveal_order)
  return from_combined(x, lp, pdim, ldim)


@functools.partial(nnx.jit, static_argnames=("lp", "ll", "steps", "predictor", "eps", "pgraph",
                                             "lgraph", "noise", "temperature",
                                             "reveal_order"))
def _sample_joint_jit(model, key, protein_lengths, ligand_lengths, *, lp, ll, steps, predictor,
                      eps, pgraph, lgraph, noise, temperature, reveal_order):
  def log_score_fn(protein, ligand, sigma):
    return model(protein, ligand, sigma, sigma, protein_lengths, ligand_lengths)

  return sample_joint_scores(key, log_score_fn, pgraph, lgraph, noise, protein_lengths,
                             ligand_lengths, lp, ll, steps=steps, predictor=predictor, eps=eps,
                             temperature=temperature, reveal_order=reveal_order)


def sample_joint(key: Array, model: ProteinLigandDDiT, cfg, protein_lengths: Array,
                 ligand_lengths: Array, *, protein_length: int | None = None,
                 ligand_length: int | None = None, steps: int | None = None,
                 predictor: str | None = None, eps: float | None = None,
                 temperature: float = 1.0, reveal_order: str = "random") -> tuple[Array, Array]:
  """Protein-ligand pairs from noise with the dual-track model (cross-attention both ways).

  Args:
    key: PRNG key.
    model: the dual-track model (switched to eval mode here).
    cfg: the protein-ligand config (sampling.steps/predictor/eps are the defaults).
    protein_lengths: (B,) int residues to generate per pair, in [1, protein_length].
    ligand_lengths: (B,) int SMILES tokens per pair, in [1, ligand_length].
    protein_length, ligand_length: padded widths (default cfg.model.length, cfg.ligand.length).
    temperature: T of `sampler.tempered_score` (1 = the model's own distribution).
    reveal_order: "random" or "confidence" (first_hitting; `sedd_jax.sampling.first_hitting`).

  Returns:
    ((B, Lp) int32 ESM-2 ids, (B, Ll) int32 SMILES ids), `<pad>` past the lengths.
  """
  protein_lengths = jnp.asarray(protein_lengths, jnp.int32)
  ligand_lengths = jnp.asarray(ligand_lengths, jnp.int32)
  lp = int(protein_length or cfg.model.length)
  ll = int(ligand_length or cfg.ligand.length)
  for name, lengths, top in (("protein_lengths", protein_lengths, lp),
                             ("ligand_lengths", ligand_lengths, ll)):
    if lengths.ndim != 1 or lengths.shape != protein_lengths.shape:
      raise ValueError(f"{name} must be (B,) like protein_lengths {protein_lengths.shape}; got "
                       f"{lengths.shape}")
    if lengths.size and (int(jnp.min(lengths)) < 1 or int(jnp.max(lengths)) > top):
      raise ValueError(f"{name} must lie in [1, {top}]; got {np.asarray(lengths).tolist()}")
  pgraph, lgraph = get_graphs(cfg)
  steps, predictor, eps = sampler.resolve_options(combined_graph(pgraph, lgraph), cfg.sampling,
                                                  steps=steps, predictor=predictor, eps=eps,
                                                  temperature=temperature,
                                                  reveal_order=reveal_order)
  model.eval()
  return _sample_joint_jit(model, key, protein_lengths, ligand_lengths, lp=lp, ll=ll,
                           steps=steps, predictor=predictor, eps=eps, pgraph=pgraph,
                           lgraph=lgraph, noise=diffusion.get_noise(cfg.noise),
                           temperature=float(temperature), reveal_order=reveal_order)
