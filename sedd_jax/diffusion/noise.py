"""Noise schedules sigma(t) for t in [0, 1]: log-linear, geometric and the fork's cosine.

Every schedule is a frozen (hashable) dataclass, so it can be a static argument of `jax.jit`.
`total_noise(t)` is the integrated noise sigma(t) and `rate_noise(t)` its time derivative
dsigma/dt; both are elementwise over any shape and return float32.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

Array = jax.Array


def _as_time(t: Any) -> Array:
  return jnp.asarray(t, dtype=jnp.float32)


class Noise:
  """Base class: `__call__(t) -> (sigma, dsigma)`, both with the shape of `t`."""

  def total_noise(self, t: Array) -> Array:
    raise NotImplementedError

  def rate_noise(self, t: Array) -> Array:
    raise NotImplementedError

  def __call__(self, t: Array) -> tuple[Array, Array]:
    """Returns `(sigma(t), dsigma(t))`, each float32 with the shape of `t`."""
    return self.total_noise(t), self.rate_noise(t)


@dataclasses.dataclass(frozen=True)
class LogLinear(Noise):
  """sigma(t) = -log(1 - (1 - eps) t), so that 1 - exp(-sigma) = (1 - eps) t.

  The reference's schedule for the absorbing graph; `eps` keeps sigma(1) finite.
  """

  eps: float = 1e-3

  def total_noise(self, t: Array) -> Array:
    """sigma(t), elementwise: (...) -> (...) float32."""
    t = _as_time(t)
    return -jnp.log1p(-(1.0 - self.eps) * t)

  def rate_noise(self, t: Array) -> Array:
    """dsigma/dt = (1 - eps) / (1 - (1 - eps) t), elementwise: (...) -> (...) float32."""
    t = _as_time(t)
    return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t)


@dataclasses.dataclass(frozen=True)
class Geometric(Noise):
  """sigma(t) = sigma_min^(1 - t) sigma_max^t."""

  sigma_min: float = 1e-3
  sigma_max: float = 1.0

  def total_noise(self, t: Array) -> Array:
    """sigma(t), elementwise: (...) -> (...) float32."""
    t = _as_time(t)
    smin = jnp.float32(self.sigma_min)
    smax = jnp.float32(self.sigma_max)
    return smin ** (1.0 - t) * smax ** t

  def rate_noise(self, t: Array) -> Array:
    """dsigma/dt = sigma(t) (log sigma_max - log sigma_min): (...) -> (...) float32."""
    log_ratio = jnp.log(jnp.float32(self.sigma_max)) - jnp.log(jnp.float32(self.sigma_min))
    return self.total_noise(t) * log_ratio


@dataclasses.dataclass(frozen=True)
class Cosine(Noise):
  """The protein fork's schedule: sigma(t) = smax + (smin - smax) (1 + cos(pi t)) / 2.

  sigma(0) = sigma_min, sigma(1) = sigma_max; dsigma/dt = (smax - smin) pi sin(pi t) / 2,
  which is 0 at both ends.
  """

  sigma_min: float = 1e-4
  sigma_max: float = 0.5

  def total_noise(self, t: Array) -> Array:
    """sigma(t), elementwise: (...) -> (...) float32."""
    t = _as_time(t)
    smin = jnp.float32(self.sigma_min)
    smax = jnp.float32(self.sigma_max)
    # = smax + (smin - smax)(1 + cos(pi t))/2, written as smin + (smax - smin) sin^2(pi t/2)
    # so that small sigma near t = 0 keeps its float32 relative precision.
    return smin + (smax - smin) * jnp.sin(math.pi / 2.0 * t) ** 2

  def rate_noise(self, t: Array) -> Array:
    """dsigma/dt, elementwise: (...) -> (...) float32."""
    t = _as_time(t)
    smin = jnp.float32(self.sigma_min)
    smax = jnp.float32(self.sigma_max)
    return (smax - smin) * (math.pi / 2.0) * jnp.sin(math.pi * t)


NOISE_TYPES = ("loglinear", "geometric", "cosine")


def get_noise(cfg_noise) -> Noise:
  """Builds the schedule named by `cfg_noise.type` (a ConfigDict or mapping).

  Keys: `type` (loglinear | geometric | cosine), `eps` (loglinear), `sigma_min`, `sigma_max`
  (geometric, cosine). Raises ValueError naming `noise.type` for an unknown type.
  """
  kind = cfg_noise["type"]
  if kind == "loglinear":
    noise = LogLinear(eps=float(cfg_noise["eps"]))
  elif kind == "geometric":
    noise = Geometric(sigma_min=float(cfg_noise["sigma_min"]),
                      sigma_max=float(cfg_noise["sigma_max"]))
  elif kind == "cosine":
    noise = Cosine(sigma_min=float(cfg_noise["sigma_min"]), sigma_max=float(cfg_noise["sigma_max"]))
  else:
    raise ValueError(f"noise.type = {kind!r} is not a noise schedule; choose one of {NOISE_TYPES}")
  logger.debug("noise schedule %s", noise)
  return noise
