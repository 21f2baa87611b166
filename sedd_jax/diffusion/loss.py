"""The score-entropy training loss: time sampling, forward corruption and the per-sequence loss.

A training step is (see `sedd_jax.diffusion.curriculum` for the curriculum variants):

  t = sample_time(key_t, B)                          # (B,)
  x = perturb(key_x, graph, noise, x0, t)            # (B, L)
  log_score = model(x, noise.total_noise(t))         # (B, L, D)
  loss = score_entropy_loss(graph, noise, log_score, x, x0, t, weight).mean()

Packed rows (several sequences per row, `segment_ids` (B, L), 0 = padding): one t per ROW (the
sequences of a row share t and so sigma(t); docs/packing.md says why), and
`score_entropy_loss(..., segment_ids=)` returns the per-SEQUENCE sums (B, S); the training loss
is their mean over the sequences, as for unpacked batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sedd_jax.diffusion.graph import Graph, check_broadcasts_to
from sedd_jax.diffusion.noise import Noise

Array = jax.Array


def sample_time(key: Array, batch: int, eps: float = 1e-3) -> Array:
  """t ~ U[eps, 1) for each sequence, as the reference: (1 - eps) U + eps. Returns (batch,) f32."""
  u = jax.random.uniform(key, (batch,), dtype=jnp.float32)
  return (1.0 - eps) * u + eps


def _scale(sigma_scale, batch: int) -> Array:
  """Checks a sigma scale (scalar or (B,)) and returns it as float32 of shape () or (B,)."""
  s = jnp.asarray(sigma_scale, dtype=jnp.float32)
  if s.ndim > 1 or (s.ndim == 1 and s.shape[0] != batch):
    raise ValueError(f"sigma_scale must be a scalar or have shape (B,) = ({batch},); got {s.shape}")
  return s


def _check_t(t: Array, x0: Array) -> Array:
  t = jnp.asarray(t, dtype=jnp.float32)
  if x0.ndim != 2 or t.shape != (x0.shape[0],):
    raise ValueError(f"t must have shape (B,) = ({x0.shape[0] if x0.ndim else '?'},) for tokens "
                     f"(B, L) = {x0.shape}; got t of shape {t.shape}")
  return t


def segment_sum(values: Array, segment_ids: Array, num_segments: int) -> Array:
  """Sums of `values` (B, L) over the positions of each segment: (B, num_segments), column s - 1
  for segment s = 1..num_segments (segment 0, padding, is dropped; absent segments give 0)."""
  seg = jnp.arange(1, num_segments + 1, dtype=jnp.int32)
  member = jnp.asarray(segment_ids)[..., None] == seg  # (B, L, S)
  return jnp.einsum("bl,bls->bs", values, member.astype(values.dtype),
                    precision=jax.lax.Precision.HIGHEST)


def perturb(key: Array, graph: Graph, noise: Noise, x0: Array, t: Array,
            sigma_scale: Array | float | None = None) -> Array:
  """Corrupts clean tokens: x ~ exp(sigma(t) Q)[:, x0], per position.

  Args:
    key: PRNG key.
    graph: the diffusion graph.
    noise: the noise schedule.
    x0: (B, L) int clean tokens.
    t: (B,) times in [0, 1].
    sigma_scale: optional scalar or (B,) factor on sigma(t) (the `sigma_scale` curriculum).

  Returns:
    (B, L) int32 perturbed tokens.
  """
  t = _check_t(t, x0)
  sigma = noise.total_noise(t)
  if sigma_scale is not None:
    sigma = sigma * _scale(sigma_scale, x0.shape[0])
  return graph.sample_transition(key, x0, sigma)


def score_entropy_loss(graph: Graph, noise: Noise, log_score: Array, x: Array, x0: Array,
                       t: Array, weight: Array | None = None,
                       sigma_scale: Array | float | None = None,
                       segment_ids: Array | None = None, num_segments: int = 0) -> Array:
  """Per-sequence loss: sum over positions of dsigma(t) * score_entropy(log_score, sigma(t), x, x0).

  Args:
    graph: the diffusion graph.
    noise: the noise schedule.
    log_score: (B, L, D) model output (log score), computed at sigma(t) (times sigma_scale).
    x: (B, L) int perturbed tokens.
    x0: (B, L) int clean tokens.
    t: (B,) times.
    weight: optional (B, L) position weights (0 on padding); broadcastable shapes are accepted
      only if they broadcast to (B, L).
    sigma_scale: optional scalar or (B,) factor c: the loss is then that of the scaled schedule
      c * sigma(t), i.e. sigma -> c sigma and dsigma -> c dsigma (consistent `sigma_scale`
      curriculum; leave None to score against the unscaled schedule, as the fork did).
    segment_ids: optional (B, L) int of packed rows (0 = padding, 1..S the sequences).
    num_segments: S, the most sequences a row holds (with `segment_ids`).

  Returns:
    (B,) float32 loss per sequence (take the mean over the batch for the training loss); with
    `segment_ids`, (B, S) float32 loss per sequence of each row (0 for absent sequences).
  """
  t = _check_t(t, x0)
  sigma, dsigma = noise(t)
  if sigma_scale is not None:
    c = _scale(sigma_scale, x0.shape[0])
    sigma, dsigma = sigma * c, dsigma * c
  entropy = graph.score_entropy(log_score, sigma, x, x0)  # (B, L)
  per_pos = dsigma[:, None] * entropy
  if weight is not None:
    weight = jnp.asarray(weight)
    check_broadcasts_to("weight", weight, x.shape)
    # where, not a bare product, so that a non-finite value on a padded position counts 0.
    per_pos = jnp.where(weight != 0, per_pos * weight, 0.0)
  if segment_ids is not None:
    if jnp.shape(segment_ids) != x.shape:
      raise ValueError(f"segment_ids {jnp.shape(segment_ids)} must have the tokens' shape "
                       f"{x.shape}")
    if num_segments < 1:
      raise ValueError(f"num_segments must be >= 1 with segment_ids; got {num_segments}")
    return segment_sum(per_pos, segment_ids, num_segments)
  return per_pos.sum(axis=-1)
