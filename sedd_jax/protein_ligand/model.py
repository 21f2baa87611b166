"""The dual-track protein-ligand DDiT (Flax NNX): a protein track, a ligand (SMILES) track and
bidirectional cross-attention in every layer.

Each track is a DDiT stack (`sedd_jax.model.ddit.DDiTBlock`: adaLN-Zero, rotary self-attention
over its own positions, 4x GELU MLP) with its own token embedding, vocabulary and output layer
(`DDiTFinalLayer`) and its own absorbing state: protein D_p = 33 (ESM-2, <mask> = 32), ligand
D_l = SMILES tokens + 1 (<mask> = the SmilesTokenizer's last id). One sigma embedding
(`TimestepEmbedder`) is shared; each track gets its own sigma (B,), so a clean conditioning track
runs at sigma = 0.

Layer n (both tracks have the same width and number of layers):

  x_p = protein_blocks[n](x_p, rotary_p, c_p, protein_lengths)       # self-attention + MLP
  x_l = ligand_blocks[n](x_l, rotary_l, c_l, ligand_lengths)
  x_p, x_l = (protein_cross[n](x_p, x_l, c_p, ligand_lengths),      # protein queries ligand
              ligand_cross[n](x_l, x_p, c_l, protein_lengths))      # ligand queries protein

Cross-attention (`CrossAttention`): adaLN-Zero on the query side (shift, scale, gate from the
track's own c; gate zero-initialised, so a fresh model starts as two independent DDiTs),
LayerNorm on the key/value side, no rotary (the two sequences share no positions), keys beyond
the other track's length never attended. Every attention runs through
`sedd_jax.model.attention.dot_product_attention` on (B, L, H, Dh) arrays, so it mixes positions
of ONE example only, never across the batch.

`tracks="protein"` / `"ligand"` runs one track alone (no cross-attention; the other track's
parameters are not touched), `heads` restricts which output layers are evaluated (a clean
conditioning track needs none). Output: (protein log score (B, Lp, D_p) | None, ligand log score
(B, Ll, D_l) | None), float32, with the DDiT's absorbing `scale_by_sigma` and zero at the input
token.

Parameter groups (state paths): `protein_embed`, `protein_blocks`, `protein_cross`,
`protein_output`, `ligand_embed`, `ligand_blocks`, `ligand_cross`, `ligand_output`, `sigma_map`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sedd_jax import diffusion
from sedd_jax.model import attention as attention_lib
from sedd_jax.model import ddit
from sedd_jax.model import layers
from sedd_jax.model import norm_modulate as norm_lib

logger = logging.getLogger(__name__)

Array = jax.Array

TRACKS = ("both", "protein", "ligand")
GROUPS = ("protein_embed", "protein_blocks", "protein_cross", "protein_output", "ligand_embed",
          "ligand_blocks", "ligand_cross", "ligand_output", "sigma_map")


class CrossAttention(nnx.Module):
  """adaLN-Zero cross-attention: queries from x (B, Lq, H), keys/values from y (B, Lk, H).

  x + gate(c) * out(attn(q(modulate(norm(x), c)), kv(norm_kv(y)))), float32 residual.
  """

  def __init__(self, dim: int, n_heads: int, cond_dim: int, dropout: float, dtype,
               attention: str, chunk: int, rngs: nnx.Rngs, norm_impl: str = "reference"):
    self.n_heads = n_heads
    self.norm_impl = norm_impl
    self.dtype = dtype
    self.attention = attention
    self.chunk = chunk
    self.norm_q = layers.LayerNorm(dim)
    self.norm_kv = layers.LayerNorm(dim)
    linear = layers.linear  # the DDiT's init and dtypes
    self.attn_q = linear(rngs, dim, dim, bias=False, dtype=dtype)
    self.attn_kv = linear(rngs, dim, 2 * dim, bias=False, dtype=dtype)
    self.attn_out = linear(rngs, dim, dim, bias=False, dtype=dtype)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.adaLN_modulation = linear(rngs, cond_dim, 3 * dim, dtype=dtype, zero=True)

  def __call__(self, x: Array, y: Array, c: Array, kv_lengths: Array | None) -> Array:
    """x (B, Lq, H) f32, y (B, Lk, H) f32, c (B, C) f32, kv_lengths (B,) | None -> (B, Lq, H)."""
    b, lq, dim = x.shape
    lk = y.shape[1]
    dh = dim // self.n_heads
    shift, scale, gate = jnp.split(self.adaLN_modulation(c)[:, None, :], 3, axis=-1)
    q = self.attn_q(norm_lib.norm_modulate(x, self.norm_q.scale[...], shift, scale,
                                           impl=self.norm_impl, out_dtype=self.dtype))
    q = q.reshape(b, lq, self.n_heads, dh)
    kv = self.attn_kv(self.norm_kv(y)).reshape(b, lk, 2, self.n_heads, dh)
    o = attention_lib.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1], kv_lengths,
                                            backend=self.attention, chunk=self.chunk)
    o = self.attn_out(o.reshape(b, lq, dim))
    return x + gate.astype(jnp.float32) * self.dropout(o).astype(jnp.float32)


class ProteinLigandDDiT(nnx.Module):
  """Protein track + ligand track + bidirectional cross-attention. See the module docstring.

  Args:
    cfg_model: the `model` sub-config (hidden_size, n_heads, n_blocks, cond_dim, dropout,
      scale_by_sigma, attention, attention_chunk, dtype, remat, norm_impl, gelu_impl, gate_grad
      (the self-attention blocks' residual adds; the cross-attention's keep autodiff),
      cross_attention);
      shared by the two tracks.
    protein_dim: D_p = protein graph dim (33 for absorbing ESM-2).
    ligand_dim: D_l = ligand graph dim (SMILES tokens + 1 for absorbing).
    absorb: whether both graphs are absorbing (needed by scale_by_sigma).
    rngs: nnx.Rngs; `params` for init, `dropout` for dropout.
  """

  def __init__(self, cfg_model, protein_dim: int, ligand_dim: int, absorb: bool = True, *,
               rngs: nnx.Rngs):
    get = lambda k: ddit.cfg_value(cfg_model, k)
    hidden = int(get("hidden_size"))
    n_heads = int(get("n_heads"))
    n_blocks = int(get("n_blocks"))
    cond_dim = int(get("cond_dim"))
    dropout = float(get("dropout"))
    dtype_name = str(get("dtype"))
    attention = str(get("attention"))
    chunk = int(get("attention_chunk"))
    remat = str(get("remat"))
    norm_impl = str(get("norm_impl"))
    gelu_impl = str(get("gelu_impl"))
    gate_grad = str(get("gate_grad"))
    cross = bool(cfg_model.get("cross_attention", True))
    if hidden <= 0 or n_heads <= 0 or hidden % n_heads or (hidden // n_heads) % 2:
      raise ValueError(f"model.hidden_size {hidden} must be a positive multiple of model.n_heads "
                       f"{n_heads} with an even head dim (rotary)")
    if n_blocks < 1:
      raise ValueError(f"model.n_blocks {n_blocks} must be >= 1")
    ddit.check_choices(dtype=dtype_name, attention=attention, remat=remat, norm_impl=norm_impl,
                       gelu_impl=gelu_impl, gate_grad=gate_grad)
    norm_impl = norm_lib.resolve_impl(norm_impl, ddit.DTYPES[dtype_name])
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"model.dropout {dropout} must be in [0, 1)")
    if protein_dim < 2 or ligand_dim < 2:
      raise ValueError(f"protein_dim {protein_dim} and ligand_dim {ligand_dim} must be >= 2")
    self.scale_by_sigma = bool(get("scale_by_sigma"))
    if self.scale_by_sigma and not absorb:
      raise ValueError("model.scale_by_sigma=True needs absorbing graphs")
    self.hidden_size = hidden
    self.n_heads = n_heads
    self.n_blocks = n_blocks
    self.protein_dim = int(protein_dim)
    self.ligand_dim = int(ligand_dim)
    self.absorb = bool(absorb)
    self.cross_attention = cross
    self.remat = remat
    dtype = ddit.DTYPES[dtype_name]

    bound = 1.0 / math.sqrt(hidden)
    init = lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound)

    def embed(dim):
      return nnx.Embed(dim, hidden, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
                       embedding_init=init)

    def blocks():
      return nnx.List([ddit.DDiTBlock(hidden, n_heads, cond_dim, dropout, dtype, attention, chunk,
                                      rngs, remat_mlp=remat == "mlp", norm_impl=norm_impl,
                                      gelu_impl=gelu_impl, gate_grad=gate_grad)
                         for _ in range(n_blocks)])

    def crosses():
      return nnx.List([CrossAttention(hidden, n_heads, cond_dim, dropout, dtype, attention, chunk,
                                      rngs, norm_impl) for _ in range(n_blocks)])

    self.sigma_map = layers.TimestepEmbedder(cond_dim, rngs)
    self.protein_embed = embed(self.protein_dim)
    self.ligand_embed = embed(self.ligand_dim)
    self.protein_blocks = blocks()
    self.ligand_blocks = blocks()
    self.protein_cross = crosses() if cross else None
    self.ligand_cross = crosses() if cross else None
    self.protein_output = ddit.DDiTFinalLayer(hidden, self.protein_dim, cond_dim, rngs, norm_impl)
    self.ligand_output = ddit.DDiTFinalLayer(hidden, self.ligand_dim, cond_dim, rngs, norm_impl)

  # --------------------------------------------------------------------------------------------

  def _check(self, name: str, tokens, sigma, lengths):
    """Validates one track's inputs; returns tokens int32 (B, L), sigma f32 (B,), lengths."""
    tokens = jnp.asarray(tokens)
    sigma = jnp.asarray(sigma)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"{name} tokens must be (B, L) integer; got {tokens.shape} {tokens.dtype}")
    b = tokens.shape[0]
    if sigma.shape != (b,):
      raise ValueError(f"{name} sigma must be (B,) = ({b},); got {sigma.shape}")
    if lengths is not None:
      lengths = jnp.asarray(lengths)
      if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name} lengths must be (B,) = ({b},) integer; got {lengths.shape} "
                         f"{lengths.dtype}")
      lengths = lengths.astype(jnp.int32)
    return tokens.astype(jnp.int32), sigma.astype(jnp.float32), lengths

  def _inputs(self, embed: nnx.Embed, tokens: Array, sigma: Array, positions: Array | None):
    """One track's block inputs: embedded tokens (B, L, H), conditioning c = SiLU(sigma map)
    (B, C) and the rotary (cos, sin) tables."""
    rot = layers.rotary_cos_sin(tokens.shape[1], self.hidden_size // self.n_heads,
                                positions=positions)
    return embed(tokens), jax.nn.silu(self.sigma_map(sigma)), rot

  def _head(self, output_layer, x, c, sigma, tokens):
    """Output layer + absorbing scale_by_sigma + zero at the input token: -> (B, L, D) f32."""
    return layers.score_head(output_layer(x, c), sigma, tokens, self.scale_by_sigma)

  def __call__(self, protein: Array | None, ligand: Array | None, sigma_protein: Array | None,
               sigma_ligand: Array | None, protein_lengths: Array | None = None,
               ligand_lengths: Array | None = None, *, tracks: str = "both",
               heads: Sequence[str] | None = None, protein_segment_ids: Array | None = None,
               protein_positions: Array | None = None) -> tuple[Array | None, Array | None]:
    """Log scores of both tracks.

    Args:
      protein: (B, Lp) int ESM-2 ids (None when tracks == "ligand").
      ligand: (B, Ll) int SMILES ids (None when tracks == "protein").
      sigma_protein: (B,) float noise level of the protein track (0 for clean context).
      sigma_ligand: (B,) float noise level of the ligand track.
      protein_lengths: (B,) int real protein lengths (keys beyond are masked) | None = all.
      ligand_lengths: (B,) int real ligand lengths | None = all.
      tracks: "both" (with cross-attention), "protein" or "ligand" (that track alone).
      heads: output layers to evaluate, a subset of ("protein", "ligand"); default: the tracks
        that run. A track whose head is not evaluated returns None.
      protein_segment_ids, protein_positions: (B, Lp) int packed protein rows, as the DDiT's
        `segment_ids` / `positions` (only with tracks="protein": a ligand belongs to one protein).

    Returns:
      (protein log score (B, Lp, D_p) f32 | None, ligand log score (B, Ll, D_l) f32 | None).
    """
    run_p, run_l, heads = _tracks_and_heads(tracks, heads)
    if (protein_segment_ids is not None or protein_positions is not None) and tracks != "protein":
      raise ValueError(f"packed protein rows need tracks='protein' (got {tracks!r})")
    if run_p:
      protein, sigma_protein, protein_lengths = self._check(
          "protein", protein, sigma_protein, protein_lengths)
      protein_segment_ids, protein_positions = ddit.check_packing(
          *protein.shape, protein_segment_ids, protein_positions)
      x_p, c_p, rot_p = self._inputs(self.protein_embed, protein, sigma_protein,
                                     protein_positions)
    if run_l:
      ligand, sigma_ligand, ligand_lengths = self._check(
          "ligand", ligand, sigma_ligand, ligand_lengths)
      x_l, c_l, rot_l = self._inputs(self.ligand_embed, ligand, sigma_ligand, None)
    if run_p and run_l and protein.shape[0] != ligand.shape[0]:
      raise ValueError(f"protein {protein.shape} and ligand {ligand.shape} batches differ")
    cross = run_p and run_l and self.cross_attention

    def layer(pblock, lblock, pcross, lcross, x_p, x_l):
      """One layer: self blocks of the tracks that run, then cross-attention both ways."""
      if run_p:
        x_p = pblock(x_p, *rot_p, c_p, protein_lengths, protein_segment_ids)
      if run_l:
        x_l = lblock(x_l, *rot_l, c_l, ligand_lengths)
      if cross:
        x_p, x_l = pcross(x_p, x_l, c_p, ligand_lengths), lcross(x_l, x_p, c_l, protein_lengths)
      return x_p, x_l

    if self.remat == "block":
      layer = nnx.remat(layer)
    elif self.remat == "block_save_dots":
      layer = nnx.remat(layer, policy=jax.checkpoint_policies.checkpoint_dots)
    xs = (x_p if run_p else None, x_l if run_l else None)
    for n in range(self.n_blocks):
      xs = layer(self.protein_blocks[n] if run_p else None,
                 self.ligand_blocks[n] if run_l else None,
                 self.protein_cross[n] if cross else None,
                 self.ligand_cross[n] if cross else None, *xs)
    x_p, x_l = xs
    out_p = self._head(self.protein_output, x_p, c_p, sigma_protein, protein) if (
        "protein" in heads) else None
    out_l = self._head(self.ligand_output, x_l, c_l, sigma_ligand, ligand) if (
        "ligand" in heads) else None
    return out_p, out_l


def _tracks_and_heads(tracks: str, heads: Sequence[str] | None) -> tuple[bool, bool, tuple]:
  """(run the protein track, run the ligand track, heads to evaluate) of a call; ValueError for
  an unknown `tracks` or a head whose track does not run."""
  if tracks not in TRACKS:
    raise ValueError(f"tracks {tracks!r}: choose one of {TRACKS}")
  run_p = tracks in ("both", "protein")
  run_l = tracks in ("both", "ligand")
  if heads is None:
    heads = tuple(n for n, r in (("protein", run_p), ("ligand", run_l)) if r)
  for h in heads:
    if h not in ("protein", "ligand") or (h == "protein" and not run_p) or (
        h == "ligand" and not run_l):
      raise ValueError(f"head {h!r} is not among the tracks run ({tracks!r})")
  return run_p, run_l, tuple(heads)


# ----------------------------------------------------------------------------------------------
# Config helpers and the model factory.


def resolve_ligand_vocab(cfg) -> int:
  """Fills `cfg.ligand.graph.tokens` (SMILES ids without <mask>; <mask> = that number) from the
  SmilesTokenizer saved with the prepared data (`<cfg.data.prepared>/smiles_vocab.json`) when it
  is 0, preparing the data first if needed (`sedd_jax.data.pipeline.ensure_prepared`). Returns
  the value. A config with a positive value is left alone.
  """
  tokens = int(cfg.ligand.graph.tokens)
  if tokens > 0:
    return tokens
  from sedd_jax.data import prepare as prepare_lib  # pylint: disable=import-outside-toplevel
  from sedd_jax.data import tokenizers  # pylint: disable=import-outside-toplevel
  path = prepare_lib.resolve_path(os.path.join(cfg.data.prepared, "smiles_vocab.json"))
  if not path.exists():
    try:
      from sedd_jax.data import pipeline  # pylint: disable=import-outside-toplevel
      pipeline.ensure_prepared(cfg)
    except ImportError as e:
      raise FileNotFoundError(f"{path} is missing and the data pipeline is unavailable ({e}); "
                              "run python -m sedd_jax.data.prepare on the pairs first") from e
  tok = tokenizers.SmilesTokenizer.load(path)
  tokens = int(tok.mask_id)  # vocab_size - 1: the absorbing state is the tokenizer's <mask>
  with cfg.ligand.unlocked() if hasattr(cfg.ligand, "unlocked") else contextlib.nullcontext():
    cfg.ligand.graph.tokens = tokens
  logger.info("ligand vocabulary from %s: %d tokens + <mask> = %d", path, tokens, tokens)
  return tokens


def get_graphs(cfg) -> tuple[diffusion.Graph, diffusion.Graph]:
  """(protein graph, ligand graph) of the config; `cfg.ligand.graph.tokens` must be resolved
  (see `resolve_ligand_vocab`)."""
  if int(cfg.ligand.graph.tokens) <= 0:
    raise ValueError("cfg.ligand.graph.tokens is 0: call "
                     "sedd_jax.protein_ligand.resolve_ligand_vocab(cfg) (or build_model) first")
  pgraph = diffusion.get_graph(cfg.graph)
  lgraph = diffusion.get_graph(cfg.ligand.graph)
  if pgraph.absorb != lgraph.absorb:
    raise ValueError("graph.type and ligand.graph.type must both be absorb or both uniform")
  return pgraph, lgraph


def build_model(cfg, rngs: nnx.Rngs) -> ProteinLigandDDiT:
  """The model factory of the generic trainer: resolves the ligand vocabulary and builds the
  dual-track model from `cfg.model` and the two graphs."""
  resolve_ligand_vocab(cfg)
  pgraph, lgraph = get_graphs(cfg)
  model = ProteinLigandDDiT(cfg.model, pgraph.dim, lgraph.dim, absorb=pgraph.absorb, rngs=rngs)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logger.info("protein-ligand DDiT: %d parameters (protein D %d, ligand D %d)", n, pgraph.dim,
              lgraph.dim)
  return model


def param_groups(model: ProteinLigandDDiT) -> dict[str, Any]:
  """{group name: nnx.State of its parameters} for the groups of GROUPS present in the model."""
  state = nnx.state(model, nnx.Param)
  return {g: state[g] for g in GROUPS if g in state}
