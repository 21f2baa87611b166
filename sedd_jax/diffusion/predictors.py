"""One step of the reverse (denoising) process, as the reference's predictors.

Every step takes `(key, graph, noise, score, x, t, step_size)`:
  score: (B, L, D) the EXPONENTIATED model output at (x, sigma(t)) (the reference's
    sampling score function);
  x: (B, L) int current tokens; t: (B,) current time; step_size: scalar dt > 0 (time goes
    from t to t - dt).
and returns the new (B, L) int32 tokens. Each `*_step` is `sample_categorical(key, *_probs(...),
draw)` with the matching `*_probs(graph, noise, score, x, t, step_size)`, which returns the
(unnormalised) probabilities; `draw` is "unbiased" (default) or "reference" (the reference's
float32 draw; sedd_jax.diffusion.categorical). With draw="reference",
`categorical_from_uniform(probs, u)` reproduces a step from u = jax.random.uniform(key, probs.shape)
(how the parity fixtures' u are used).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sedd_jax.diffusion.categorical import sample_categorical
from sedd_jax.diffusion.graph import Graph, check_broadcasts_to
from sedd_jax.diffusion.noise import Noise

Array = jax.Array


def _check(graph: Graph, score: Array, x: Array, t: Array) -> Array:
  if x.ndim != 2:
    raise ValueError(f"x must have shape (B, L); got {x.shape}")
  if score.shape != (*x.shape, graph.dim):
    raise ValueError(f"score must have shape (B, L, D) = {(*x.shape, graph.dim)}; got {score.shape}")
  t = jnp.asarray(t, dtype=jnp.float32)
  if t.shape != (x.shape[0],):
    raise ValueError(f"t must have shape (B,) = ({x.shape[0]},); got {t.shape}")
  return t


def euler_probs(graph: Graph, noise: Noise, score: Array, x: Array, t: Array,
                step_size: Array | float) -> Array:
  """one_hot(x) + step_size * dsigma(t) * reverse_rate(x, score): (B, L, D)."""
  t = _check(graph, score, x, t)
  dsigma = noise.rate_noise(t)  # (B,)
  rate = (step_size * dsigma)[:, None, None] * graph.reverse_rate(x, score)
  return jax.nn.one_hot(x, graph.dim, dtype=rate.dtype) + rate


def euler_step(key: Array, graph: Graph, noise: Noise, score: Array, x: Array, t: Array,
               step_size: Array | float, draw: str = "unbiased") -> Array:
  """Euler (tau-leaping) step of the reverse chain: (B, L) -> (B, L) int32."""
  return sample_categorical(key, euler_probs(graph, noise, score, x, t, step_size), draw)


def analytic_probs(graph: Graph, noise: Noise, score: Array, x: Array, t: Array,
                   step_size: Array | float) -> Array:
  """Tweedie step probabilities: staggered_score(score, dsig) * transp_transition(x, dsig),
  dsig = sigma(t) - sigma(t - step_size). Returns (B, L, D)."""
  t = _check(graph, score, x, t)
  dsig = noise.total_noise(t) - noise.total_noise(t - step_size)  # (B,)
  return graph.staggered_score(score, dsig) * graph.transp_transition(x, dsig)


def analytic_step(key: Array, graph: Graph, noise: Noise, score: Array, x: Array, t: Array,
                  step_size: Array | float, draw: str = "unbiased") -> Array:
  """Analytic (Tweedie tau-leaping) step: (B, L) -> (B, L) int32."""
  return sample_categorical(key, analytic_probs(graph, noise, score, x, t, step_size), draw)


def remdm_probs(graph: Graph, noise: Noise, score: Array, x: Array, t: Array,
                step_size: Array | float, eta: Array | float) -> Array:
  """Analytic step with ReMDM remasking (Wang et al. 2025, "Remasking discrete diffusion
  models with inference-time scaling"; absorbing graph only), the "max-capped" schedule.

  With alpha = e^{-sigma}, s = t - step_size and the remasking probability
  sigma_t = min(eta, (1 - alpha_s) / alpha_t) (the largest that keeps the forward marginals),
  ReMDM's posterior is
    unmasked x:  stays with probability 1 - sigma_t, is masked again with sigma_t;
    mask:        unmasks with total probability (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t)
                 (the analytic step's (alpha_s - alpha_t) / (1 - alpha_t) plus the remasked
                 mass), stays masked with (1 - alpha_s - sigma_t alpha_t) / (1 - alpha_t).
  The mask rows are the analytic step's, with the unmask columns scaled by
  (alpha_s - alpha_t + sigma_t alpha_t) / (alpha_s - alpha_t) and the mask column by
  (1 - alpha_s - sigma_t alpha_t) / (1 - alpha_s); eta = 0 gives `analytic_probs`. With the
  exact score the samples still follow the data distribution (remasking trades model calls
  for the chance to correct earlier tokens). Returns (B, L, D).
  """
  if not graph.absorb:
    raise ValueError("ReMDM remasking needs the absorbing graph")
  probs = analytic_probs(graph, noise, score, x, t, step_size)
  t = jnp.asarray(t, jnp.float32)
  alpha_t = jnp.exp(-noise.total_noise(t))[:, None, None]  # (B, 1, 1)
  alpha_s = jnp.exp(-noise.total_noise(t - step_size))[:, None, None]
  sigma_t = jnp.minimum(eta, (1.0 - alpha_s) / alpha_t)
  unmask = (alpha_s - alpha_t + sigma_t * alpha_t) / jnp.maximum(alpha_s - alpha_t, 1e-30)
  stay = (1.0 - alpha_s - sigma_t * alpha_t) / jnp.maximum(1.0 - alpha_s, 1e-30)
  is_mask_col = jnp.arange(graph.dim) == graph.mask
  masked_rows = probs * jnp.where(is_mask_col, stay, unmask)
  mask_hot = is_mask_col.astype(probs.dtype)
  unmasked_rows = (1.0 - sigma_t) * jax.nn.one_hot(x, graph.dim, dtype=probs.dtype) + (
      sigma_t * mask_hot)
  return jnp.where((x == graph.mask)[..., None], masked_rows, unmasked_rows)


def remdm_step(key: Array, graph: Graph, noise: Noise, score: Array, x: Array, t: Array,
               step_size: Array | float, eta: Array | float = 0.0, draw: str = "unbiased"
               ) -> Array:
  """Analytic step with ReMDM remasking (`remdm_probs`): (B, L) -> (B, L) int32."""
  return sample_categorical(key, remdm_probs(graph, noise, score, x, t, step_size, eta), draw)


def denoise_probs(graph: Graph, noise: Noise, score: Array, x: Array, t: Array,
                  step_size: Array | float | None = None) -> Array:
  """Final denoising probabilities at time t (all remaining noise removed), sig = sigma(t):
  staggered_score(score, sig) * transp_transition(x, sig), without the absorbing column for an
  absorbing graph. Returns (B, L, D), or (B, L, D - 1) when `graph.absorb`.
  `step_size` is ignored (kept for the common step signature)."""
  del step_size
  t = _check(graph, score, x, t)
  sig = noise.total_noise(t)
  probs = graph.staggered_score(score, sig) * graph.transp_transition(x, sig)
  return probs[..., :-1] if graph.absorb else probs


def denoise_step(key: Array, graph: Graph, noise: Noise, score: Array, x: Array, t: Array,
                 step_size: Array | float | None = None, draw: str = "unbiased") -> Array:
  """Final denoising step (never returns the mask): (B, L) -> (B, L) int32."""
  return sample_categorical(key, denoise_probs(graph, noise, score, x, t, step_size), draw)


def project(x: Array, fixed_tokens: Array, fixed_mask: Array) -> Array:
  """Overwrites the fixed (conditioning) positions of x.

  Args:
    x: (B, L) int tokens.
    fixed_tokens: tokens broadcastable to (B, L), e.g. (B, L) or (L,).
    fixed_mask: bool, broadcastable to (B, L); True where `fixed_tokens` is kept.

  Returns:
    (B, L) tokens with x's dtype.
  """
  fixed_tokens = jnp.asarray(fixed_tokens)
  fixed_mask = jnp.asarray(fixed_mask)
  check_broadcasts_to("fixed_tokens", fixed_tokens, x.shape)
  check_broadcasts_to("fixed_mask", fixed_mask, x.shape)
  return jnp.where(fixed_mask.astype(bool), fixed_tokens.astype(x.dtype), x)


PREDICTORS = {"euler": euler_step, "analytic": analytic_step}
"""Predictor steps by the names used in `cfg.sampling.predictor`."""
