"""The first-hitting sampler of the absorbing graph, under one `lax.while_loop`.

`sampler.sample(..., predictor="first_hitting")` runs it (Zheng et al. 2024, "Masked diffusion
models are secretly time-agnostic masked models"): under the absorbing forward process each
token is masked independently, with probability m(t) = 1 - e^{-sigma(t)} at time t, so going
backwards a masked token is revealed at its own time, with P(still masked at s | masked at t) =
m(s) / m(t). With n masked tokens at time t, the next reveal happens at the latest of n such
times: m(tau) = m(t) u^{1/n}, u ~ U(0, 1); the revealed position is uniform among the masked
ones and its token is drawn from the model's conditional p(y | unmasked) (the normalised
non-mask columns of the score at sigma(tau), clamped at sigma(eps)). Nothing else happens
between reveals, so the model is called once per revealed token (n calls in all, whatever
`steps` says) and the process has no time-discretisation error: with the exact score the
samples follow the data distribution exactly (tests/test_first_hitting.py). Each sequence of
the batch has its own clock (sigma is (B,)); the loop runs while any sequence has a masked
position (fixed and padded positions are never masked), so the call count is the largest
number of generated positions in the batch. Random numbers: reveal k uses fold_in(key, k).

Reveal order (`order`): "random" (the default, above) picks the revealed position uniformly
among the masked ones. "confidence" picks the masked position whose most likely token has the
largest share of the score (MaskGIT's order; ties go to the first such position). With the
exact score both give the data distribution (the chain rule holds in any order, chosen
adaptively or not); a learned score is not exactly one joint law, so the order changes which of
its conditionals are used: the confident ones first. Measured on protein-ligand models
(BENCHMARKS.md, issue 19): it raised the valid ligands of a weak CPU-trained model (0-2% to 14%
at T = 0.3) and lowered those of `small` (35% to 2-11%). The clock is the same.

Remasking (`remask=eta > 0`): after each reveal at sigma, each sequence with probability eta
masks one generated token (uniform among them; never a fixed one) and redraws it from the model
at the same sigma. With the exact score that is a Gibbs move on the revealed tokens given the
mask pattern, so the sampler stays exact at any eta; it costs one more model call per reveal
when any sequence of the batch remasks (`lax.cond`), so up to 2 L calls.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sedd_jax.diffusion import categorical as _categorical
from sedd_jax.diffusion.graph import Graph
from sedd_jax.diffusion.noise import Noise

Array = jax.Array


def _token_at(key: Array, score: Array, pos: Array, draw: str) -> Array:
  """(B,) int32 token drawn from the non-mask columns of `score` (B, L, D) at `pos` (B,)."""
  probs = jnp.take_along_axis(score, pos[:, None, None], axis=1)[:, 0, :-1]  # (B, D - 1)
  return _categorical.sample_categorical(key, probs, draw)


REVEAL_ORDERS = ("random", "confidence")


def first_hitting_reveal(key: Array, score: Array, masked: Array, draw: str,
                         order: str = "random") -> tuple[Array, Array]:
  """What one reveal of the first-hitting sampler unmasks (see the module docstring).

  Args:
    key: PRNG key.
    score: (B, L, D) exponentiated score at the reveal time (its last column is the mask).
    masked: (B, L) bool, positions still to generate.
    draw: categorical draw ("unbiased" or "reference").
    order: "random" or "confidence" (module docstring).

  Returns:
    (position (B,) int32: uniform among the masked ones, or the most confident of them;
    token (B,) int32 drawn from the non-mask columns of the score there). Rows without a masked
    position get position 0.
  """
  k_pos, k_tok = jax.random.split(key)
  if order == "confidence":
    tokens = score[..., :-1]
    share = jnp.max(tokens, axis=-1) / jnp.maximum(jnp.sum(tokens, axis=-1),
                                                   jnp.finfo(jnp.float32).tiny)
    pos = jnp.argmax(jnp.where(masked, share, -1.0), axis=-1).astype(jnp.int32)
  else:
    pos = _categorical.sample_categorical(k_pos, masked.astype(jnp.float32), draw)
  return pos, _token_at(k_tok, score, pos, draw)


def next_reveal_log_m(key: Array, log_m: Array, n: Array) -> Array:
  """log m(tau) of the next reveal among n masked tokens: log m(t) + log(u) / n, (B,)."""
  u = jax.random.uniform(key, log_m.shape, jnp.float32, minval=jnp.finfo(jnp.float32).tiny)
  return log_m + jnp.log(u) / jnp.maximum(n, 1).astype(jnp.float32)


def remask_and_redraw(key: Array, score_at: Callable[[Array, Array], Array], graph: Graph,
                      x: Array, generated: Array, sigma: Array, eta: float, draw: str,
                      nfe: Array, active: Array | None = None) -> tuple[Array, Array]:
  """The remasking corrector: per sequence with probability `eta`, one generated token of
  x (B, L) (among `generated` (B, L) bool) is masked and redrawn from `score_at` at sigma (B,),
  a Gibbs move that keeps the state's distribution. `active` (B,) bool (default all): the rows
  that may move (the loop passes the rows that revealed a token in this call, so a finished
  row is not remasked while another row of its batch is still revealing: a row's moves do not
  depend on its batch). Returns (x, nfe + 1 if any row moved)."""
  batch = x.shape[0]
  row = jnp.arange(batch)
  cand = generated & (x != graph.mask)
  do = (jax.random.uniform(jax.random.fold_in(key, 0), (batch,)) < eta) & cand.any(-1)
  if active is not None:
    do &= active
  pos = _categorical.sample_categorical(jax.random.fold_in(key, 1), cand.astype(jnp.float32),
                                        draw)

  def call(x):
    xm = x.at[row, pos].set(jnp.where(do, graph.mask, x[row, pos]))
    token = _token_at(jax.random.fold_in(key, 2), score_at(xm, sigma), pos, draw)
    return x.at[row, pos].set(jnp.where(do, token, x[row, pos])), nfe + 1

  return jax.lax.cond(jnp.any(do), call, lambda x: (x, nfe), x)


def first_hitting_loop(key: Array, score_at: Callable[[Array, Array], Array],
                       proj: Callable[[Array], Array], graph: Graph, noise: Noise, x: Array,
                       valid: Array, generated: Array, eps: float, draw: str,
                       remask: float, order: str = "random") -> tuple[Array, Array]:
  """The first-hitting reveals (module docstring), each followed by `remask_and_redraw` when
  `remask` > 0.

  Args:
    key: PRNG key; reveal k uses fold_in(key, k).
    score_at: (x (B, L), sigma (B,)) -> (B, L, D) exponentiated score.
    proj: x -> x with the fixed positions written.
    graph: the absorbing graph.
    noise: the noise schedule.
    x: (B, L) int32 start (all `<mask>` where generated).
    valid: (B, L) bool, positions < lengths.
    generated: (B, L) bool, the positions it may remask (valid and not fixed).
    eps: final time (the smallest sigma a reveal uses is sigma(eps)).
    draw: categorical draw.
    remask: eta in [0, 1].
    order: reveal order, "random" or "confidence" (module docstring).

  Returns:
    (x (B, L) int32 with every valid position revealed, number of model calls).
  """
  batch = x.shape[0]
  row = jnp.arange(batch)
  x = proj(x)
  log_m = jnp.log(-jnp.expm1(-noise.total_noise(jnp.ones((batch,), jnp.float32))))
  sigma_min = noise.total_noise(jnp.full((batch,), eps, jnp.float32))

  def masked_of(x):
    return (x == graph.mask) & valid

  def body(carry):
    x, log_m, k, nfe = carry
    masked = masked_of(x)
    n = masked.sum(axis=-1)  # (B,)
    key_k = jax.random.fold_in(key, k)
    new_log_m = next_reveal_log_m(jax.random.fold_in(key_k, 0), log_m, n)
    sigma = jnp.maximum(-jnp.log1p(-jnp.exp(new_log_m)), sigma_min)
    pos, token = first_hitting_reveal(jax.random.fold_in(key_k, 1), score_at(x, sigma), masked,
                                      draw, order)
    active = n > 0
    x = x.at[row, pos].set(jnp.where(active, token, x[row, pos]))
    if remask > 0:
      x, nfe = remask_and_redraw(jax.random.fold_in(key_k, 2), score_at, graph, x, generated,
                                 sigma, remask, draw, nfe, active)
    return x, jnp.where(active, new_log_m, log_m), k + 1, nfe + 1

  x, _, _, nfe = jax.lax.while_loop(lambda carry: jnp.any(masked_of(carry[0])), body,
                                    (x, log_m, jnp.int32(0), jnp.int32(0)))
  return x, nfe
