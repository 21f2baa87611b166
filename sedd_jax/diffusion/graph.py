"""Diffusion graphs (forward rate matrices Q) over a vocabulary of D states.

`Absorbing(tokens)`: D = tokens + 1, every token jumps to the absorbing (mask) state D - 1.
`Uniform(tokens)`: D = tokens, every token jumps to every other, rate 1/D.

Shapes: token arrays `i`, `x`, `x0` are (B, L) integers; per-sequence noise levels `sigma`,
`dsigma` are (B,) and are broadcast here as (B, 1) against (B, L) and as (B, 1, 1) against
(B, L, D). A sigma of another rank or batch raises ValueError (never a silent broadcast).
Scores are (B, L, D) ratios p(y) / p(x); `score_entropy` takes the LOG score, like the
reference. Returned float arrays are float32 (or the score's dtype where a score goes in).

The graphs are frozen dataclasses, hashable, so they can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from sedd_jax.diffusion.categorical import sample_categorical

logger = logging.getLogger(__name__)

Array = jax.Array


def _per_sequence(sigma: Array, i: Array, name: str = "sigma") -> Array:
  """Checks sigma (B,) against tokens (B, L) and returns sigma as (B, 1)."""
  sigma = jnp.asarray(sigma)
  if i.ndim != 2:
    raise ValueError(f"tokens must have shape (B, L); got {i.shape}")
  if sigma.ndim != 1 or sigma.shape[0] != i.shape[0]:
    raise ValueError(
        f"{name} must have shape (B,) = ({i.shape[0]},) to go with tokens of shape (B, L) = "
        f"{i.shape}; got {name} of shape {sigma.shape}")
  return sigma[:, None]


def _check_score(score: Array, i: Array, dim: int, name: str = "score") -> None:
  if score.ndim != 3 or score.shape[:2] != i.shape or score.shape[-1] != dim:
    raise ValueError(
        f"{name} must have shape (B, L, D) = {(*i.shape, dim)}; got {score.shape} "
        f"(tokens {i.shape})")


def check_broadcasts_to(name: str, a: Array, shape: tuple[int, ...]) -> None:
  """Raises ValueError unless `a` broadcasts to exactly `shape` (e.g. (L,) or (B, L) to (B, L))."""
  try:
    ok = jnp.broadcast_shapes(a.shape, shape) == tuple(shape)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"{name} {a.shape} must broadcast to the tokens' shape {tuple(shape)}")


def _esigm1(sigma: Array) -> Array:
  """E = exp(sigma) - 1 as the reference computes it: expm1 below 0.5, exp - 1 above."""
  return jnp.where(sigma < 0.5, jnp.expm1(sigma), jnp.exp(sigma) - 1.0)


def _take(a: Array, idx: Array) -> Array:
  """a (..., D), idx (...) -> a[..., idx] of shape (...)."""
  return jnp.take_along_axis(a, idx[..., None].astype(jnp.int32), axis=-1)[..., 0]


class Graph:
  """Shared operations; subclasses define the graph-specific ones."""

  tokens: int

  @property
  def dim(self) -> int:
    raise NotImplementedError

  @property
  def absorb(self) -> bool:
    raise NotImplementedError

  def _one_hot(self, i: Array, dtype=jnp.float32) -> Array:
    return jax.nn.one_hot(i, self.dim, dtype=dtype)

  def reverse_rate(self, i: Array, score: Array) -> Array:
    """Reverse rate at state i: transp_rate(i) * score off the diagonal, minus their sum on it.

    Args:
      i: (B, L) int tokens.
      score: (B, L, D) score (ratios, not logs).

    Returns:
      (B, L, D); each row sums to 0.
    """
    _check_score(score, i, self.dim)
    hot = self._one_hot(i, dtype=bool)
    off = jnp.where(hot, 0.0, self.transp_rate(i) * score).astype(score.dtype)
    return off - jnp.where(hot, off.sum(axis=-1, keepdims=True), 0.0).astype(score.dtype)

  def sample_rate(self, key: Array, i: Array, rate: Array) -> Array:
    """Draws from one_hot(i) + rate (an Euler step of the reverse chain).

    Args:
      key: PRNG key.
      i: (B, L) int tokens.
      rate: (B, L, D) step-size-scaled rate (rows sum to 0).

    Returns:
      (B, L) int32 tokens.
    """
    _check_score(rate, i, self.dim, name="rate")
    return sample_categorical(key, self._one_hot(i, dtype=rate.dtype) + rate)

  def staggered_score(self, score: Array, dsigma: Array) -> Array:
    """exp(-dsigma Q) applied to the score (the graph's closed form, `_staggered_score`).

    Args:
      score: (B, L, D) score.
      dsigma: (B,) noise decrement.

    Returns:
      (B, L, D).
    """
    if score.ndim != 3 or score.shape[-1] != self.dim:
      raise ValueError(f"score must have shape (B, L, D) with D = {self.dim}; got {score.shape}")
    return self._staggered_score(score, _per_sequence(dsigma, score[..., 0], name="dsigma"))

  def score_entropy(self, log_score: Array, sigma: Array, x: Array, x0: Array) -> Array:
    """Denoising score entropy at each position (the graph's closed form, `_score_entropy`).

    Args:
      log_score: (B, L, D) log score s.
      sigma: (B,) total noise.
      x: (B, L) perturbed tokens.
      x0: (B, L) clean tokens.

    Returns:
      (B, L) float, >= 0 and 0 where the log score is the true log ratio.
    """
    _check_score(log_score, x, self.dim, name="log_score")
    if x0.shape != x.shape:
      raise ValueError(f"x0 {x0.shape} and x {x.shape} must have the same shape")
    return self._score_entropy(log_score, _per_sequence(sigma, x), x, x0)

  def _staggered_score(self, score: Array, ds: Array) -> Array:
    raise NotImplementedError

  def _score_entropy(self, log_score: Array, sigma: Array, x: Array, x0: Array) -> Array:
    """sigma: (B, 1)."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Uniform(Graph):
  """Uniform graph: Q = (1/D) 11^T - I, D = tokens."""

  tokens: int

  @property
  def dim(self) -> int:
    return self.tokens

  @property
  def absorb(self) -> bool:
    return False

  def rate(self, i: Array) -> Array:
    """Column i of Q: 1/D everywhere, -(D - 1)/D at i. i (...) -> (..., D) float32."""
    d = self.dim
    return jnp.where(self._one_hot(i, dtype=bool), -(d - 1) / d, 1.0 / d).astype(jnp.float32)

  def transp_rate(self, i: Array) -> Array:
    """Row i of Q (Q is symmetric): (...) -> (..., D) float32."""
    return self.rate(i)

  def transition(self, i: Array, sigma: Array) -> Array:
    """Column i of exp(sigma Q): (1 - e^-sigma)/D off i, the rest on i.

    Args:
      i: (B, L) int tokens.
      sigma: (B,) total noise.

    Returns:
      (B, L, D) probabilities.
    """
    s = _per_sequence(sigma, i)[..., None]  # (B, 1, 1)
    off = -jnp.expm1(-s) / self.dim  # (B, 1, 1)
    diag = 1.0 - (self.dim - 1) * off
    return jnp.where(self._one_hot(i, dtype=bool), diag, off)

  def transp_transition(self, i: Array, sigma: Array) -> Array:
    """Row i of exp(sigma Q) (symmetric): (B, L), (B,) -> (B, L, D)."""
    return self.transition(i, sigma)

  def sample_transition(self, key: Array, i: Array, sigma: Array) -> Array:
    """Draws x_t ~ exp(sigma Q)[:, x0]: with probability 1 - e^-sigma a uniform token.

    (The uniform draw may return i itself, so the fraction that changes is
    (1 - e^-sigma)(D - 1)/D.)

    Args:
      key: PRNG key.
      i: (B, L) int tokens.
      sigma: (B,) total noise.

    Returns:
      (B, L) int32 tokens.
    """
    s = _per_sequence(sigma, i)
    k_move, k_tok = jax.random.split(key)
    move = jax.random.uniform(k_move, i.shape, dtype=jnp.float32) < -jnp.expm1(-s)
    new = jax.random.randint(k_tok, i.shape, 0, self.dim, dtype=jnp.int32)
    return jnp.where(move, new, i.astype(jnp.int32))

  def _staggered_score(self, score: Array, ds: Array) -> Array:
    """p_{sigma - dsigma}(y) / p_sigma(x), approximately; ds (B, 1)."""
    epow = jnp.exp(-ds)[..., None]  # (B, 1, 1)
    total = score.sum(axis=-1, keepdims=True)
    return (epow - 1.0) / (self.dim * epow) * total + score / epow

  def sample_limit(self, key: Array, shape: tuple[int, ...]) -> Array:
    """Uniform tokens of `shape`, int32."""
    return jax.random.randint(key, shape, 0, self.dim, dtype=jnp.int32)

  def _score_entropy(self, log_score: Array, sigma: Array, x: Array, x0: Array) -> Array:
    """The reference's closed form: (1/D) sum_{y != x} [e^{s_y} - r_y s_y + r_y (log r_y - 1)]
    with r_y = p_sigma(y | x0) / p_sigma(x | x0), so it is >= 0 and 0 at s = log r."""
    d = self.dim
    esigm1 = _esigm1(sigma)  # (B, 1)
    ratio = 1.0 - d / (esigm1 + d)  # (B, 1)
    s_x = _take(log_score, x)
    s_x0 = _take(log_score, x0)
    same = x == x0

    neg = log_score.mean(axis=-1) - s_x / d
    neg = jnp.where(same, ratio * neg, s_x0 / esigm1 + neg)
    const = jnp.where(same,
                      (d - 1) / d * ratio * (jnp.log(ratio) - 1.0),
                      ((-jnp.log(ratio) - 1.0) / ratio - (d - 2)) / d)
    sexp = jnp.exp(log_score)
    pos = sexp.mean(axis=-1) - _take(sexp, x) / d
    return pos - neg + const


@dataclasses.dataclass(frozen=True)
class Absorbing(Graph):
  """Absorbing graph: D = tokens + 1 states, the last (index `tokens`) is the mask."""

  tokens: int

  @property
  def dim(self) -> int:
    return self.tokens + 1

  @property
  def absorb(self) -> bool:
    return True

  @property
  def mask(self) -> int:
    """Index of the absorbing state, D - 1."""
    return self.tokens

  def rate(self, i: Array) -> Array:
    """Column i of Q: one_hot(mask) - one_hot(i). (...) -> (..., D) float32."""
    mask_hot = jax.nn.one_hot(jnp.full(i.shape, self.mask), self.dim, dtype=jnp.float32)
    return mask_hot - self._one_hot(i)

  def transp_rate(self, i: Array) -> Array:
    """Row i of Q: -one_hot(i), plus 1 everywhere if i is the mask. (...) -> (..., D) float32."""
    is_mask = (i == self.mask)[..., None].astype(jnp.float32)
    return is_mask - self._one_hot(i)

  def transition(self, i: Array, sigma: Array) -> Array:
    """Not defined for the absorbing graph (the reference leaves it out too)."""
    raise NotImplementedError("Absorbing.transition is not defined (as in the reference); "
                              "use transp_transition or sample_transition")

  def transp_transition(self, i: Array, sigma: Array) -> Array:
    """Row i of exp(sigma Q): e^-sigma at i, plus 1 - e^-sigma everywhere if i is the mask.

    Args:
      i: (B, L) int tokens.
      sigma: (B,) total noise.

    Returns:
      (B, L, D).
    """
    s = _per_sequence(sigma, i)  # (B, 1)
    stay = jnp.exp(-s)
    extra = jnp.where(i == self.mask, 1.0 - stay, 0.0)  # (B, L)
    return stay[..., None] * self._one_hot(i, dtype=stay.dtype) + extra[..., None]

  def sample_transition(self, key: Array, i: Array, sigma: Array) -> Array:
    """Masks each token independently with probability 1 - e^-sigma.

    Args:
      key: PRNG key.
      i: (B, L) int tokens.
      sigma: (B,) total noise.

    Returns:
      (B, L) int32 tokens.
    """
    s = _per_sequence(sigma, i)
    move = jax.random.uniform(key, i.shape, dtype=jnp.float32) < -jnp.expm1(-s)
    return jnp.where(move, self.mask, i).astype(jnp.int32)

  def _staggered_score(self, score: Array, ds: Array) -> Array:
    """score e^dsigma, the mask column plus (1 - e^dsigma) sum(score); ds (B, 1)."""
    extra = (1.0 - jnp.exp(ds)) * score.sum(axis=-1)  # (B, L)
    out = score * jnp.exp(ds)[..., None]
    return out.at[..., -1].add(extra)

  def sample_limit(self, key: Array, shape: tuple[int, ...]) -> Array:
    """All-mask tokens of `shape`, int32 (`key` is unused; kept for a common signature)."""
    del key
    return jnp.full(shape, self.mask, dtype=jnp.int32)

  def _score_entropy(self, log_score: Array, sigma: Array, x: Array, x0: Array) -> Array:
    """Only masked positions contribute: at x = mask, sum_{y != mask} e^{s_y} - s_{x0}/E +
    (1/E)(log(1/E) - 1), E = e^sigma - 1; 0 elsewhere. The true log ratio is log(1/E) at x0 and
    -inf elsewhere, where it is 0."""
    masked = x == self.mask  # (B, L)
    inv_e = 1.0 / _esigm1(sigma)  # (B, 1)
    # Unmasked positions are zeroed before exp so that they cannot overflow (or poison grads).
    s = jnp.where(masked[..., None], log_score, 0.0)
    neg = inv_e * _take(s, x0)
    pos = jnp.exp(s[..., :-1]).sum(axis=-1)
    const = inv_e * (jnp.log(inv_e) - 1.0)
    return jnp.where(masked, pos - neg + const, 0.0)


GRAPH_TYPES = ("absorb", "uniform")


def get_graph(cfg_graph) -> Graph:
  """Builds the graph named by `cfg_graph.type` (absorb | uniform) with `cfg_graph.tokens`.

  Raises ValueError naming `graph.type` for an unknown type.
  """
  kind = cfg_graph["type"]
  tokens = int(cfg_graph["tokens"])
  if kind == "absorb":
    graph = Absorbing(tokens)
  elif kind == "uniform":
    graph = Uniform(tokens)
  else:
    raise ValueError(f"graph.type = {kind!r} is not a graph; choose one of {GRAPH_TYPES}")
  logger.debug("graph %s (dim %d)", graph, graph.dim)
  return graph
