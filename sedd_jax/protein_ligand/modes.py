"""Training modes and losses of the protein-ligand model (conditional sampling with
classifier-free guidance: `sedd_jax.protein_ligand.conditional`).

Modes (`cfg.mode`):

- protein_only: protein track corrupted and run ALONE (no ligand track, no cross-attention);
  loss on the protein.
- ligand_only: the same for the ligand; with unpaired ligands configured
  (`cfg.data.ligand_corpus`, batches with `corpus_ligand_tokens`/`corpus_ligand_lengths`), each
  example's ligand is the corpus one with probability `cfg.data.ligand_corpus_fraction`.
- ligand_given_protein: protein clean (sigma = 0, context), ligand corrupted, cross-attention
  both ways; loss on the ligand.
- protein_given_ligand: the reverse.
- joint: both corrupted with one t per example, cross-attention; loss = mean of the two tracks.
- all: one of the five drawn per step from the step key (`lax.switch`, inside jit).

Single-track modes run one track ALONE: the other track's parameters and every cross-attention
parameter get exactly zero gradient (they are not in the computation at all). In a conditional
mode the clean track is context only: its output head is not evaluated (zero gradient), its
blocks are trained through the cross-attention. Parameters that a step leaves at zero gradient
still move under Adam momentum (and weight decay) from earlier steps of other modes in `all`;
wrap the optimizer with `skip_unused_updates` so that they get no update at all.

The per-track loss is the reference's: per-sequence sum over real (non-pad) positions of
dsigma(t) * score_entropy, mean over the batch (`sedd_jax.diffusion.loss`), with the curriculum
of `cfg.curriculum` applied to each corrupted track.

Batches: dicts with `tokens (B, Lp) int32`, `lengths (B,) int32` (protein, ESM-2 ids) and
`ligand_tokens (B, Ll) int32`, `ligand_lengths (B,) int32` (SMILES ids), padding after the
sequence.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sedd_jax import diffusion
from sedd_jax.data import ligand_corpus as corpus_lib
from sedd_jax.protein_ligand.model import ProteinLigandDDiT
from sedd_jax.protein_ligand.model import get_graphs

logger = logging.getLogger(__name__)

Array = jax.Array

MODES = ("protein_only", "ligand_only", "ligand_given_protein", "protein_given_ligand", "joint")
"""The five training modes, in the order of their index (metrics' `mode`, `cfg.mode_weights`)."""
ALL = "all"
BATCH_KEYS = ("tokens", "lengths", "ligand_tokens", "ligand_lengths")
CORPUS_KEYS = ("corpus_ligand_tokens", "corpus_ligand_lengths")


def batch_keys(cfg) -> tuple[str, ...]:
  """The batch arrays a step takes: BATCH_KEYS, + CORPUS_KEYS with `cfg.data.ligand_corpus`."""
  return BATCH_KEYS + (CORPUS_KEYS if corpus_fraction(cfg) is not None else ())


def corpus_fraction(cfg) -> float | None:
  """`cfg.data.ligand_corpus_fraction` when `cfg.data.ligand_corpus` is set, else None; a
  ValueError naming the key outside [0, 1]."""
  if not str(cfg.data.get("ligand_corpus", "") or ""):
    return None
  frac = float(cfg.data.ligand_corpus_fraction)
  if not 0.0 <= frac <= 1.0:
    raise ValueError(f"data.ligand_corpus_fraction = {frac} must be in [0, 1]")
  return frac


def mode_index(mode: str) -> int:
  """Index of `mode` in MODES; a ValueError naming `mode` otherwise (also for `all`)."""
  if mode not in MODES:
    raise ValueError(f"mode = {mode!r} is not a training mode; choose one of {MODES + (ALL,)}")
  return MODES.index(mode)


def check_mode(cfg) -> str:
  """Validates `cfg.mode` (and `cfg.mode_weights` for `all`); returns the mode."""
  mode = cfg.mode
  if mode != ALL:
    mode_index(mode)
  weights = tuple(cfg.get("mode_weights", ()) or ())
  if weights and (len(weights) != len(MODES) or min(weights) < 0 or sum(weights) <= 0):
    raise ValueError(f"mode_weights = {weights} must be {len(MODES)} non-negative numbers (one "
                     f"per mode of {MODES}) with a positive sum, or () for uniform")
  return mode


def _weight(lengths: Array, length: int) -> Array:
  """Padding weight: (B,) lengths -> (B, L) float32, 1 on real positions, 0 after."""
  return (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.float32)


def _check_batch(batch: dict[str, Any], cfg=None) -> None:
  """Keys and shapes of a batch (+ CORPUS_KEYS when `cfg` sets data.ligand_corpus)."""
  keys = BATCH_KEYS if cfg is None else batch_keys(cfg)
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"protein-ligand batch lacks {missing}; it needs {keys}")
  b = batch["tokens"].shape[0]
  for k, rank in zip(keys, (2, 1, 2, 1, 2, 1)):
    shape = batch[k].shape
    if len(shape) != rank or shape[0] != b:
      raise ValueError(f"batch[{k!r}] has shape {shape}; expected rank {rank} with batch {b}")
  if len(keys) > len(BATCH_KEYS) and batch[CORPUS_KEYS[0]].shape != batch["ligand_tokens"].shape:
    raise ValueError(f"batch['corpus_ligand_tokens'] has shape {batch[CORPUS_KEYS[0]].shape}; "
                     f"expected that of batch['ligand_tokens'], {batch['ligand_tokens'].shape}")


def _corrupt(key: Array, graph, noise, cur, x0: Array, step: Array, time_eps: float,
             t: Array | None = None):
  """Draws t (unless given) and corrupts x0 (B, L) -> (t (B,), x (B, L), model sigma (B,),
  loss sigma scale ())."""
  k_t, k_x = jax.random.split(key)
  if t is None:
    t = cur.sample_time(k_t, x0.shape[0], step, eps=time_eps)
  corrupt_scale, loss_scale = cur.sigma_scales(step)
  x = diffusion.perturb(k_x, graph, noise, x0, t, sigma_scale=corrupt_scale)
  sigma = noise.total_noise(t) * loss_scale
  return t, x, sigma, loss_scale


def mode_loss(mode: str, model: ProteinLigandDDiT, batch: dict[str, Array], key: Array,
              step: Array | int, cfg) -> tuple[Array, dict[str, Array]]:
  """The loss of one fixed training mode (see the module docstring).

  Args:
    mode: one of MODES (static).
    model: the dual-track model.
    batch: `tokens (B, Lp)`, `lengths (B,)`, `ligand_tokens (B, Ll)`, `ligand_lengths (B,)`.
    key: PRNG key of this step.
    step: training step (may be traced), for the curriculum.
    cfg: the protein-ligand config.

  Returns:
    (scalar loss, metrics) with metrics `loss`, `protein_loss`, `ligand_loss` (0 for a track
    without loss) and `mode` (int32 index in MODES).
  """
  idx = mode_index(mode)
  pgraph, lgraph = get_graphs(cfg)
  noise = diffusion.get_noise(cfg.noise)
  cur = diffusion.get_curriculum(cfg.curriculum)
  eps = float(cfg.training.time_eps)
  p0 = jnp.asarray(batch["tokens"], jnp.int32)
  l0 = jnp.asarray(batch["ligand_tokens"], jnp.int32)
  plen = jnp.asarray(batch["lengths"], jnp.int32)
  llen = jnp.asarray(batch["ligand_lengths"], jnp.int32)
  b = p0.shape[0]
  step = jnp.asarray(step)
  k_p, k_l, k_t = jax.random.split(key, 3)
  zero = jnp.zeros((), jnp.float32)
  zeros_b = jnp.zeros((b,), jnp.float32)
  p_loss = l_loss = zero

  def track_loss(graph, out, x, x0, t, lengths, ls):
    """Batch mean of the per-sequence score-entropy loss of one track (padding weighted 0)."""
    return diffusion.score_entropy_loss(graph, noise, out, x, x0, t, _weight(lengths, x.shape[1]),
                                        sigma_scale=ls).mean()

  if mode == "protein_only":
    t, x, sigma, ls = _corrupt(k_p, pgraph, noise, cur, p0, step, eps)
    out, _ = model(x, None, sigma, None, plen, None, tracks="protein")
    p_loss = track_loss(pgraph, out, x, p0, t, plen, ls)
    loss = p_loss
  elif mode == "ligand_only":
    if CORPUS_KEYS[0] in batch:  # unpaired ligands: the corpus one with probability frac
      frac = corpus_fraction(cfg)
      if frac is None:
        raise ValueError("the batch holds unpaired ligands but data.ligand_corpus is not set")
      use = jax.random.bernoulli(jax.random.fold_in(key, corpus_lib.CORPUS_SALT), frac, (b,))
      l0 = jnp.where(use[:, None], jnp.asarray(batch[CORPUS_KEYS[0]], jnp.int32), l0)
      llen = jnp.where(use, jnp.asarray(batch[CORPUS_KEYS[1]], jnp.int32), llen)
    t, x, sigma, ls = _corrupt(k_l, lgraph, noise, cur, l0, step, eps)
    _, out = model(None, x, None, sigma, None, llen, tracks="ligand")
    l_loss = track_loss(lgraph, out, x, l0, t, llen, ls)
    loss = l_loss
  elif mode == "ligand_given_protein":
    t, x, sigma, ls = _corrupt(k_l, lgraph, noise, cur, l0, step, eps)
    _, out = model(p0, x, zeros_b, sigma, plen, llen, heads=("ligand",))
    l_loss = track_loss(lgraph, out, x, l0, t, llen, ls)
    loss = l_loss
  elif mode == "protein_given_ligand":
    t, x, sigma, ls = _corrupt(k_p, pgraph, noise, cur, p0, step, eps)
    out, _ = model(x, l0, sigma, zeros_b, plen, llen, heads=("protein",))
    p_loss = track_loss(pgraph, out, x, p0, t, plen, ls)
    loss = p_loss
  else:  # joint: one t per example for both tracks.
    t = cur.sample_time(k_t, b, step, eps=eps)
    t, xp, sp, ls = _corrupt(k_p, pgraph, noise, cur, p0, step, eps, t=t)
    _, xl, sl, _ = _corrupt(k_l, lgraph, noise, cur, l0, step, eps, t=t)
    p_out, l_out = model(xp, xl, sp, sl, plen, llen)
    p_loss = track_loss(pgraph, p_out, xp, p0, t, plen, ls)
    l_loss = track_loss(lgraph, l_out, xl, l0, t, llen, ls)
    loss = 0.5 * (p_loss + l_loss)
  metrics = {"loss": loss, "protein_loss": p_loss, "ligand_loss": l_loss,
             "mode": jnp.asarray(idx, jnp.int32)}
  return loss, metrics


def draw_mode(key: Array, cfg) -> Array:
  """The mode index of an `all` step: () int32 in [0, len(MODES)), uniform or by
  `cfg.mode_weights`."""
  weights = tuple(cfg.get("mode_weights", ()) or ())
  if not weights:
    return jax.random.randint(key, (), 0, len(MODES), dtype=jnp.int32)
  logits = jnp.log(jnp.asarray(weights, jnp.float32))
  return jax.random.categorical(key, logits).astype(jnp.int32)


def indexed_loss_fn(model: ProteinLigandDDiT, batch: dict[str, Array], key: Array,
                    step: Array | int, cfg, index: Array | int) -> tuple[Array, dict[str, Array]]:
  """The loss of mode MODES[index] with `index` a (possibly traced) int32 scalar: one compiled
  program serves every mode (`nnx.switch` over the five branches; only the selected one runs,
  and the parameters it does not use get exactly zero gradient). Same returns as `loss_fn`."""
  _check_batch(batch, cfg)
  branches = [functools.partial(_branch, m, cfg) for m in MODES]
  return nnx.switch(jnp.asarray(index, jnp.int32), branches, model, batch, key,
                    jnp.asarray(step))


def loss_fn(model: ProteinLigandDDiT, batch: dict[str, Array], key: Array, step: Array | int,
            cfg) -> tuple[Array, dict[str, Array]]:
  """Training loss of `cfg.mode`; for `all`, a mode drawn from `key` and run via lax.switch.

  Differentiate with `nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, key, step, cfg)`
  with cfg closed over (or a hashable `ml_collections.FrozenConfigDict` as a static argument).

  Args:
    model: the dual-track model (train mode for dropout).
    batch: `tokens (B, Lp)`, `lengths (B,)`, `ligand_tokens (B, Ll)`, `ligand_lengths (B,)`.
    key: PRNG key of this step.
    step: training step (int or traced scalar).
    cfg: the protein-ligand config.

  Returns:
    (scalar float32 loss, metrics dict of scalars: loss, protein_loss, ligand_loss, mode).
  """
  _check_batch(batch, cfg)
  mode = check_mode(cfg)
  if mode != ALL:
    return mode_loss(mode, model, batch, key, step, cfg)
  k_mode, k_loss = jax.random.split(key)
  return indexed_loss_fn(model, batch, k_loss, step, cfg, draw_mode(k_mode, cfg))


def _branch(mode, cfg, model, batch, key, step):
  return mode_loss(mode, model, batch, key, step, cfg)


def eval_loss_fn(model: ProteinLigandDDiT, batch: dict[str, Array], key: Array,
                 cfg) -> dict[str, Array]:
  """Evaluation losses (put the model in eval mode first; at the end of the schedule, step is
  taken as finished for the curriculum).

  For a single mode: `loss` of that mode. For `all`: the loss of every mode as `loss/<mode>`
  and `loss` = their mean. Per-track losses come as `protein_loss`/`ligand_loss` (single mode).

  Returns:
    dict of float32 scalars.
  """
  _check_batch(batch)
  batch = {k: batch[k] for k in BATCH_KEYS}  # evaluated on the pairs (no unpaired ligands)
  mode = check_mode(cfg)
  step = jnp.asarray(np.iinfo(np.int32).max, jnp.int32)
  if mode != ALL:
    _, metrics = mode_loss(mode, model, batch, key, step, cfg)
    return {k: v for k, v in metrics.items() if k != "mode"}
  out = {}
  keys = jax.random.split(key, len(MODES))
  for m, k in zip(MODES, keys):
    out[f"loss/{m}"] = mode_loss(m, model, batch, k, step, cfg)[0]
  out["loss"] = jnp.mean(jnp.stack([out[f"loss/{m}"] for m in MODES]))
  return out


def skip_unused_updates(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps an optimizer so that a parameter whose gradient is exactly zero this step (not used
  by the step's mode) gets a zero update: no Adam momentum, no weight decay.

  The inner state still advances (its moments decay); only the update is masked, leaf by leaf.
  """

  def init_fn(params):
    return inner.init(params)

  def update_fn(grads, state, params=None):
    updates, state = inner.update(grads, state, params)
    updates = jax.tree.map(
        lambda u, g: jnp.where(jnp.any(g != 0), u, jnp.zeros_like(u)), updates, grads)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)
