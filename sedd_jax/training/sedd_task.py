"""The protein-only SEDD task (configs/uniref50.py; `cfg.task == "sedd"`): a DDiT and the
score-entropy loss of its corrupted sequences, and its samples during training.

- `draw_noise`: t (B,) and one corruption key per sequence of the global batch, and the
  curriculum's sigma factors.
- `sequence_losses`: the score-entropy loss per sequence (per segment of packed rows).
- `SeddTask`: the `Task` (`sedd_jax.training.task`) built from them; `sample_hook` writes
  `samples/step_<n>.fasta` every `training.sample_every` steps.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sedd_jax import diffusion
from sedd_jax.data import tokenizers
from sedd_jax.model import attention as attention_lib
from sedd_jax.sampling import sampler as sampler_lib
from sedd_jax.training import state as state_lib
from sedd_jax.training import task as task_lib

Array = jax.Array
BATCH_KEYS = ("tokens", "lengths")
logger = logging.getLogger("sedd_jax.train")


def draw_noise(key: Array, batch: int, step: Array, curriculum: diffusion.Curriculum,
               time_eps: float) -> tuple[Array, Array, Array, Array, Array]:
  """Per-sequence randomness of a step for the whole global batch.

  Returns (t (B,), row_keys (B, 2) uint32, dropout key, corruption scale (), loss scale ()).
  """
  k_t, k_x, k_drop = jax.random.split(key, 3)
  t = curriculum.sample_time(k_t, batch, step, eps=time_eps)
  row_keys = jax.random.split(k_x, batch)
  corrupt_scale, loss_scale = curriculum.sigma_scales(step)
  return t, row_keys, k_drop, corrupt_scale, loss_scale


def sequence_losses(model: nnx.Module, graph, noise, tokens: Array, lengths: Array, t: Array,
                    row_keys: Array, corrupt_scale: Array, loss_scale: Array,
                    segment_ids: Array | None = None, positions: Array | None = None) -> Array:
  """Score-entropy loss per sequence.

  Args:
    model: a DDiT (already in train or eval mode).
    graph, noise: the diffusion graph and noise schedule.
    tokens: (B, L) int32 clean tokens; lengths: (B,) int32 real lengths (padding after).
    t: (B,) float32 times; row_keys: (B, 2) uint32 corruption keys, one per row.
    corrupt_scale, loss_scale: () float32 curriculum factors on sigma.
    segment_ids, positions: (B, L) int32 of packed rows (data.pad_to="pack"), or None.

  Returns:
    (B,) float32: sum over positions < length of dsigma * score entropy; packed rows:
    (B, MAX_SEGMENTS) float32, one sum per sequence of the row (0 for absent sequences).
  """
  tokens = tokens.astype(jnp.int32)
  lengths = lengths.astype(jnp.int32)

  def one(k, x0, ti):
    return diffusion.perturb(k, graph, noise, x0[None], ti[None], sigma_scale=corrupt_scale)[0]

  x = jax.vmap(one)(row_keys, tokens, t)
  sigma = noise.total_noise(t) * loss_scale
  packing = {} if segment_ids is None else dict(segment_ids=segment_ids, positions=positions)
  log_score = model(x, sigma, lengths, **packing)
  weight = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
  return diffusion.score_entropy_loss(
      graph, noise, log_score.astype(jnp.float32), x, tokens, t, weight, sigma_scale=loss_scale,
      segment_ids=segment_ids, num_segments=attention_lib.MAX_SEGMENTS)


def sequence_count(tokens: Array, segment_ids: Array | None) -> Array:
  """() float32 number of sequences of a batch: its rows, or the segments of packed rows."""
  if segment_ids is None:
    return jnp.float32(tokens.shape[0])
  return jnp.max(segment_ids, axis=1).astype(jnp.float32).sum()


@dataclasses.dataclass(frozen=True)
class SeddTask(task_lib.Task):
  """Protein-only SEDD (configs/uniref50.py): a DDiT and `sequence_losses`.

  `draw`: t (B,) and one corruption key per row of the global batch (`draw_noise`), and
  as `shared` the curriculum factors and the global batch's sequence count / accum; `loss`:
  sum over the micro-batch of `sequence_losses` divided by that count (so the mean over the
  micro-batches is the mean over ALL sequences, also when packed rows hold different numbers
  of sequences) / the sum; `eval_loss`: the same without curriculum, t from the given key.
  """

  graph: Any = None
  noise: Any = None

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "SeddTask":
    return cls(cfg, graph=diffusion.get_graph(cfg.graph), noise=diffusion.get_noise(cfg.noise),
               batch_keys=BATCH_KEYS + task_lib.packing_keys(cfg))

  def build_model(self, seed: int | None = None) -> nnx.Module:
    return state_lib.build_model(self.cfg, self.graph, seed)

  def draw(self, key: Array, batch: dict[str, Array], step: Array) -> task_lib.Draw:
    curriculum = diffusion.get_curriculum(self.cfg.curriculum)
    t, row_keys, k_drop, cs, ls = draw_noise(key, batch["tokens"].shape[0], step, curriculum,
                                             float(self.cfg.training.time_eps))
    rows = {**batch, "t": t, "row_keys": jax.random.key_data(row_keys)}  # (B, 2) uint32
    share = sequence_count(batch["tokens"], batch.get("segment_ids")) / int(
        self.cfg.training.accum)
    return task_lib.Draw(rows=rows, shared=(cs, ls, share), loss_key=None, dropout_key=k_drop)

  def loss(self, model, rows, shared, key, step):
    del key, step  # all randomness is per row (rows["t"], rows["row_keys"])
    cs, ls, share = shared
    per_seq = sequence_losses(model, self.graph, self.noise, rows["tokens"], rows["lengths"],
                              rows["t"], jax.random.wrap_key_data(rows["row_keys"]), cs, ls,
                              rows.get("segment_ids"), rows.get("positions"))
    total = per_seq.sum()
    return total / jnp.maximum(share, 1e-6), {"loss_sum": total}

  def eval_loss(self, model, batch, key):
    tokens, lengths = batch["tokens"], batch["lengths"]
    b = tokens.shape[0]
    plain = diffusion.Curriculum(kind="none")
    t, row_keys, _, cs, ls = draw_noise(key, b, jnp.zeros((), jnp.int32), plain,
                                        float(self.cfg.training.time_eps))
    seg = batch.get("segment_ids")
    per_seq = sequence_losses(model, self.graph, self.noise, tokens, lengths, t, row_keys, cs, ls,
                              seg, batch.get("positions"))
    return {"loss": per_seq.sum(), "n_seqs": sequence_count(tokens, seg),
            "n_tokens": lengths.astype(jnp.float32).sum()}

  def sample_hook(self, built, options, cache, writer, workdir, primary):
    """`num_samples` proteins, lengths from the validation batches -> step_<n>.fasta."""
    del writer  # no metrics of its own
    cfg, graph, noise = self.cfg, self.graph, self.noise
    n, L = int(cfg.training.num_samples), int(cfg.model.length)
    allowed = jnp.asarray(tokenizers.residue_mask(graph.dim))

    def run(ema, rest, key, lengths):
      model = nnx.merge(built.defs.eval, ema, rest)
      return sampler_lib.sample(
          key, sampler_lib.model_score_fn(model), graph, noise, (n, L),
          steps=int(cfg.sampling.steps), predictor=str(cfg.sampling.predictor),
          eps=float(cfg.sampling.eps), lengths=lengths, allowed=allowed)

    replicated = jax.sharding.NamedSharding(built.mesh, jax.sharding.PartitionSpec())
    sample_fn = cache.get("sample", cfg, built.mesh, options,
                          lambda: jax.jit(run, out_shardings=replicated,
                                          compiler_options=options or None))

    def write(state, batches, key, step):
      if batches:
        pool = np.concatenate([b["lengths"] for b in batches])
        lengths = np.resize(pool, n).astype(np.int32)
      else:
        lengths = np.full((n,), L, np.int32)
      t0 = time.perf_counter()
      tokens = np.asarray(jax.device_get(sample_fn(state.ema, built.rest, key, lengths)))
      if not primary:
        return
      tok = tokenizers.ProteinTokenizer()
      out = pathlib.Path(workdir) / "samples" / f"step_{step}.fasta"
      out.parent.mkdir(parents=True, exist_ok=True)
      lines = []
      for i in range(n):
        seq = tok.decode(tokens[i, :lengths[i]])
        lines.append(f">sample_{i} step={step} length={len(seq)}\n{seq}\n")
      out.write_text("".join(lines))
      logger.info("step %d: %d samples (%.1f s) -> %s; first: %s", step, n,
                  time.perf_counter() - t0, out, lines[0].split("\n")[1][:60] if lines else "")

    return write
