"""Training curricula that start on low noise and ramp up to the full schedule.

Progress p = step / preschool_time (p = inf, i.e. finished, when preschool_time <= 0).
Two variants (`cfg.curriculum.kind`), each with a ramp (`cfg.curriculum.ramp`):

* `sigma_scale` (the protein fork's): the noise level is multiplied by 0.1 + 0.9 cf, with the
  ramp factor cf = min(1, p) (linear), min(1, 1 - exp(-3p)) (exponential) or
  (1 - cos(pi min(1, p))) / 2 (cosine). The factor is one scalar per step; it multiplies the
  per-sequence sigma (B,) -> (B,), which the graph broadcasts as (B, 1) against tokens (B, L)
  (the fork's seed bug was broadcasting (B,) against (B, L) directly).
  `sigma_scale_mode` chooses where the factor goes:
    - `consistent` (default): corruption, model conditioning and loss all use the scaled
      schedule c sigma(t) (and dsigma -> c dsigma), so the loss is the exact score-entropy
      loss of a valid (rescaled) schedule and the model is told the noise it sees;
    - `corruption_only`: the fork's behaviour: only the corruption is scaled; the model is
      conditioned on, and the loss weighted with, the unscaled sigma(t), dsigma(t).
* `time_bias` (the fork's later, consistent variant): the schedule is untouched; t is drawn
  biased toward low noise while p < 1: t = U^(1 + 2b) (1 - 2 eps) + eps with
  b = exp(-2p) (exponential), (1 + cos(pi p)) / 2 (cosine) or 1 - p (linear);
  plain t = (1 - eps) U + eps once p >= 1. (eps = 1e-3 gives the fork's constants.)
* `none`: plain t, no scaling.

A training step (step may be a traced integer inside jit; the curriculum is static):

  cur = get_curriculum(cfg.curriculum)
  t = cur.sample_time(key_t, B, step, eps=cfg.training.time_eps)      # (B,)
  corrupt_scale, loss_scale = cur.sigma_scales(step)                   # () and ()
  x = loss.perturb(key_x, graph, noise, x0, t, sigma_scale=corrupt_scale)
  log_score = model(x, noise.total_noise(t) * loss_scale)
  per_seq = loss.score_entropy_loss(graph, noise, log_score, x, x0, t, weight,
                                    sigma_scale=loss_scale)            # (B,)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from sedd_jax.diffusion.loss import sample_time

Array = jax.Array

KINDS = ("none", "time_bias", "sigma_scale")
RAMPS = ("linear", "exponential", "cosine")
SIGMA_SCALE_MODES = ("consistent", "corruption_only")


def progress(step: Array | int, preschool_time: int) -> Array:
  """p = step / preschool_time as float32 (same shape as step); inf if preschool_time <= 0."""
  step = jnp.asarray(step, dtype=jnp.float32)
  if preschool_time <= 0:
    return jnp.full(step.shape, jnp.inf, dtype=jnp.float32)
  return step / jnp.float32(preschool_time)


def ramp_factor(p: Array, ramp: str) -> Array:
  """The `sigma_scale` ramp cf(p) in [0, 1], elementwise over p (float32).

  linear: min(1, p); exponential: min(1, 1 - exp(-3p)); cosine: (1 - cos(pi min(1, p))) / 2.
  """
  p = jnp.maximum(jnp.asarray(p, dtype=jnp.float32), 0.0)
  if ramp == "linear":
    return jnp.minimum(1.0, p)
  if ramp == "exponential":
    return jnp.minimum(1.0, 1.0 - jnp.exp(-3.0 * p))
  if ramp == "cosine":
    return (1.0 - jnp.cos(math.pi * jnp.minimum(1.0, p))) / 2.0
  raise ValueError(f"curriculum.ramp = {ramp!r} is not a ramp; choose one of {RAMPS}")


def time_bias_exponent(p: Array, ramp: str) -> Array:
  """The `time_bias` strength b(p), elementwise (p clipped to [0, 1]), float32.

  exponential: exp(-2p); cosine: (1 + cos(pi p)) / 2; linear: 1 - p. t is drawn as U^(1 + 2b).
  """
  p = jnp.clip(jnp.asarray(p, dtype=jnp.float32), 0.0, 1.0)
  if ramp == "linear":
    return 1.0 - p
  if ramp == "exponential":
    return jnp.exp(-2.0 * p)
  if ramp == "cosine":
    return (1.0 + jnp.cos(math.pi * p)) / 2.0
  raise ValueError(f"curriculum.ramp = {ramp!r} is not a ramp; choose one of {RAMPS}")


def sigma_scale_factor(step: Array | int, ramp: str, preschool_time: int) -> Array:
  """0.1 + 0.9 cf(step / preschool_time): the `sigma_scale` multiplier, shape of step (float32)."""
  return 0.1 + 0.9 * ramp_factor(progress(step, preschool_time), ramp)


def scale_sigma(sigma: Array, step: Array | int, ramp: str, preschool_time: int) -> Array:
  """sigma (B,) * (0.1 + 0.9 cf) -> (B,): per-sequence corruption noise of `sigma_scale`.

  Pass the result to a graph as is; the graph broadcasts it as (B, 1) against (B, L) tokens.
  """
  sigma = jnp.asarray(sigma)
  if sigma.ndim != 1:
    raise ValueError(f"sigma must have shape (B,); got {sigma.shape}")
  return sigma * sigma_scale_factor(step, ramp, preschool_time)


def biased_time(u: Array, step: Array | int, ramp: str, preschool_time: int,
                eps: float = 1e-3) -> Array:
  """The `time_bias` time from uniform noise u (B,) in [0, 1): (B,) float32.

  U^(1 + 2b) (1 - 2 eps) + eps while step < preschool_time, (1 - eps) U + eps after.
  """
  u = jnp.asarray(u, dtype=jnp.float32)
  p = progress(step, preschool_time)
  b = time_bias_exponent(p, ramp)
  biased = u ** (1.0 + 2.0 * b) * (1.0 - 2.0 * eps) + eps
  plain = (1.0 - eps) * u + eps
  return jnp.where(p < 1.0, biased, plain)


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """A curriculum (hashable, so it can be static under jit); see the module docstring."""

  kind: str = "none"
  ramp: str = "linear"
  preschool_time: int = 5000
  sigma_scale_mode: str = "consistent"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"curriculum.kind = {self.kind!r} is not a curriculum; choose one of {KINDS}")
    if self.ramp not in RAMPS:
      raise ValueError(f"curriculum.ramp = {self.ramp!r} is not a ramp; choose one of {RAMPS}")
    if self.sigma_scale_mode not in SIGMA_SCALE_MODES:
      raise ValueError(f"curriculum.sigma_scale_mode = {self.sigma_scale_mode!r}; choose one of "
                       f"{SIGMA_SCALE_MODES}")
    if int(self.preschool_time) != self.preschool_time or self.preschool_time < 0:
      raise ValueError(f"curriculum.preschool_time = {self.preschool_time!r} must be an integer "
                       ">= 0")

  def sample_time(self, key: Array, batch: int, step: Array | int, eps: float = 1e-3) -> Array:
    """t (batch,) float32 for this training step: biased for `time_bias`, else U[eps, 1)."""
    if self.kind != "time_bias":
      return sample_time(key, batch, eps)
    u = jax.random.uniform(key, (batch,), dtype=jnp.float32)
    return biased_time(u, step, self.ramp, self.preschool_time, eps)

  def sigma_scales(self, step: Array | int) -> tuple[Array, Array]:
    """(corruption scale, model/loss scale), both float32 scalars, for this training step.

    `sigma_scale`+consistent: (c, c); `sigma_scale`+corruption_only: (c, 1); otherwise (1, 1),
    with c = 0.1 + 0.9 cf(step / preschool_time).
    """
    one = jnp.ones((), jnp.float32)
    if self.kind != "sigma_scale":
      return one, one
    c = sigma_scale_factor(jnp.asarray(step).reshape(()), self.ramp, self.preschool_time)
    return (c, c) if self.sigma_scale_mode == "consistent" else (c, one)


def get_curriculum(cfg_curriculum) -> Curriculum:
  """Builds a Curriculum from `cfg.curriculum` (kind, ramp, preschool_time and optionally
  sigma_scale_mode), or returns a Curriculum unchanged. Bad values raise ValueError naming the key."""
  if isinstance(cfg_curriculum, Curriculum):
    return cfg_curriculum
  get = cfg_curriculum.get
  return Curriculum(kind=get("kind", "none"), ramp=get("ramp", "linear"),
                    preschool_time=get("preschool_time", 0),
                    sigma_scale_mode=get("sigma_scale_mode", "consistent"))


def sample_time_curriculum(key: Array, batch: int, step: Array | int, cfg_curriculum,
                           eps: float = 1e-3) -> Array:
  """t (batch,) float32 under the curriculum in `cfg_curriculum` (ConfigDict or Curriculum).

  kind `none` (and `sigma_scale`, which scales sigma instead) gives the plain
  `loss.sample_time(key, batch, eps)`; `time_bias` gives `biased_time`.
  """
  return get_curriculum(cfg_curriculum).sample_time(key, batch, step, eps)
