"""Sequence embeddings from a DDiT's residual stream.

- `embed(model, graph, noise, seqs, ...)` -> `Embeddings`: per-residue hidden states (L_i, H)
  and their mean per sequence, read by `DDiT.hidden_states` at `layer` (0 = the token
  embedding, k = after block k, -1 = after the last block, the output layer's input).

The model is conditioned on a noise level: t = 0 (the default) feeds the clean sequence
(nothing masked, whatever the schedule's sigma(0)) at sigma = total_noise(0); t > 0 feeds it
as the forward process corrupts it at t (absorbing graph: each residue masked with
probability 1 - e^{-sigma(t)}), the corruption keyed by the sequence's index in `seqs` and
`seed` (`likelihood.perturb_per_position`), so it does not depend on the batch or the
packing. Sequences are packed several to a row (or one per row,
`pack=False`); attention never crosses sequences and padding is dropped, so a sequence's
embedding does not depend on the other sequences (to float rounding: 1e-5 in float32).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sedd_jax.diffusion.graph import Graph
from sedd_jax.diffusion.noise import Noise
from sedd_jax.sampling import likelihood


@dataclasses.dataclass(frozen=True)
class Embeddings:
  """`embed`'s output, in the order of the sequences given.

  per_residue: N arrays (L_i, H) float32, one row per residue (masked residues included when
    t > 0).
  mean: (N, H) float32, the mean of each sequence's rows.
  provenance: how it was computed (the API fills it: source, checkpoint step, settings, seed).
  """

  per_residue: list[np.ndarray]
  mean: np.ndarray
  provenance: dict = dataclasses.field(default_factory=dict, compare=False)


def embed(model, graph: Graph, noise: Noise, seqs: Sequence[str] | Sequence[np.ndarray], *,
          max_length: int, layer: int = -1, t: float = 0.0, seed: int = 0,
          batch_size: int = 64, pack: bool = True) -> Embeddings:
  """Hidden states of each sequence (module docstring).

  Args:
    model: a DDiT (anything with its `hidden_states` and `layer_blocks`).
    graph, noise: the diffusion the model was trained with.
    seqs: residue strings or token-id arrays (L_i,) without padding
      (`likelihood.encode_sequences`: ValueError naming seqs[i]; longer than max_length is
      refused).
    max_length: the model's length (cfg.model.length).
    layer: the residual-stream state, indexed as a Python list of the n_blocks + 1 states
      (0 = the token embedding, k = after block k, -1 = after the last block); ValueError
      naming `layer` outside [-(n_blocks + 1), n_blocks].
    t: the noise level in [0, 1] (0: the clean sequence).
    seed: the corruption's seed (t > 0).
    batch_size: rows per compiled call.
    pack: several sequences per row (False: one per row of the longest's width).
  """
  if not hasattr(model, "hidden_states"):
    raise ValueError(f"embed needs a model with hidden_states (a DDiT); got "
                     f"{type(model).__name__}")
  model.layer_blocks(layer)  # ValueError naming `layer`, before anything is compiled
  if not 0.0 <= t <= 1.0:
    raise ValueError(f"t must be in [0, 1]; got {t}")
  x0 = likelihood.encode_sequences(seqs, max_length=max_length, vocab_size=graph.tokens)
  rows = likelihood.sequence_rows(x0, max_length, pack)
  rows["streams"] = likelihood.token_values(rows, np.arange(len(x0)))
  run = likelihood.jit_with_model(model, _hidden_kernel, (graph, noise, pack, int(layer),
                                                          float(t)))
  key = jax.random.key(seed)
  per_residue: list[np.ndarray | None] = [None] * len(x0)
  for batch, index in likelihood.row_batches(rows, batch_size):
    h = np.asarray(jax.device_get(run(key, batch)))[:len(index)]  # (b, W, H)
    seg = batch["segment_ids"][:len(index)]
    for r, s in zip(*np.nonzero(index >= 0)):
      per_residue[index[r, s]] = h[r][seg[r] == s + 1]
  return Embeddings(per_residue=per_residue,
                    mean=np.stack([e.mean(axis=0) for e in per_residue]).astype(np.float32))


def _hidden_kernel(model, static: tuple, key: jax.Array, batch: dict) -> jax.Array:
  """(B, W, H) float32 hidden states of a batch of rows; static = (graph, noise, pack, layer,
  t)."""
  graph, noise, pack, layer, t = static
  tokens, pos = batch["tokens"], batch["positions"]
  ts = jnp.full((tokens.shape[0],), t, jnp.float32)
  x = tokens if t == 0.0 else likelihood.perturb_per_position(key, graph, noise, tokens, ts,
                                                              batch["streams"], pos)
  kw = {"segment_ids": batch["segment_ids"], "positions": pos} if pack else {}
  return model.hidden_states(x, noise.total_noise(ts), batch["lengths"], layer=layer,
                             **kw).astype(jnp.float32)
