"""Negative ELBO of SEDD (an upper bound on the negative log-likelihood) by Monte-Carlo over t.

SEDD's bound (Lou et al. 2024, Thm 3.6) for a clean sequence x0:

  -log p_theta(x0) <= int_0^1 E_{x_t ~ p_{t|0}(. | x0)} [ sum_positions dsigma(t) *
                      score_entropy(s_theta(x_t, sigma(t)), sigma(t), x_t, x0) ] dt  +  prior,

the integrand being exactly the per-sequence training loss `score_entropy_loss` at time t, and
prior = KL(p_{1|0}(. | x0) || p_limit). Here the integral over [t_min, 1] is estimated with
`num_samples` draws of t per sequence (one corruption x_t per draw):

  iid         t_k ~ U(t_min, 1] independently; SE = std(ddof=1) / sqrt(K);
  stratified  t_k in the k-th of K equal strata; the SE reported is the iid formula, which
              over-estimates the stratified estimator's error (conservative);
  antithetic  pairs (v, 1 - v) mapped to [t_min, 1]; SE from the K/2 pair means.

Variance: for the absorbing graph one draw is about (1/t) sum_{masked} -log p(x0_i | ...), a
token being masked with probability ~t, so its second moment grows like log(1/t_min): the
draws are heavy-tailed near t = 0, and an SE from few draws tends to be an underestimate (use
a few hundred draws per data set, or stratified/antithetic t, which put draws evenly in t).

The estimate is (1 - t_min) * mean_k loss(t_k) + prior. With t_min = 0 (the default) the whole
integral is covered and the estimate is an unbiased estimate of the bound; t_min > 0 (e.g. the
training's 1e-3) drops the [0, t_min] piece, a relative error of about t_min.

Prior term. Uniform graph: per token KL(exp(sigma(1) Q)[:, x0] || uniform), computed exactly.
Absorbing graph: the reverse process starts from all-mask; p_{1|0} keeps each token unmasked
with probability e^{-sigma(1)} (= noise.eps for the log-linear schedule: sigma(1) is kept
finite only for numerical reasons), so the KL to the all-mask start is formally infinite for
any finite sigma(1). We follow SEDD/MDLM and take sigma(1) = +inf in the bound, where the prior
term is exactly 0 and the integrand above is unchanged (for log-linear noise the absorbing
integrand's weight dsigma / (e^sigma - 1) = 1/t does not depend on eps): prior = 0, and
`terminal_unmasked_prob` = e^{-sigma(1)} is reported so the size of that idealisation is visible.

With the exact score of a data distribution p0 the bound is tight: the estimate converges to
-log p0(x0) (tests/test_likelihood.py checks this with `exact_absorbing_log_score_fn`).

Masked pseudo-perplexity (`masked_nll`, absorbing graph): the metric ESM-2 and other protein
masked language models report. Each scored token is masked independently with probability
`mask_frac` (default 0.15), the model is called at the matching noise level
sigma = -log(1 - mask_frac) (the forward process masks that fraction there), and every masked
token costs -log p(x0_i | unmasked tokens), p being the score's non-mask columns normalised
(the absorbing score at a masked position is p(y | unmasked) / (e^sigma - 1)). Pseudo-perplexity
= exp(sum of costs / number of masked tokens) over a data set. It is not a likelihood (each
token is scored given ~85% of the others), so it is not comparable with the ELBO's perplexity;
bits per residue = nats per token / ln 2 for either.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sedd_jax.diffusion import loss as _loss
from sedd_jax.diffusion.graph import Graph
from sedd_jax.diffusion.noise import Noise
from sedd_jax.model.attention import MAX_SEGMENTS

logger = logging.getLogger(__name__)

Array = jax.Array
LogScoreFn = Callable[..., Array]
T_SAMPLING = ("iid", "stratified", "antithetic")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NelboResult:
  """Per-sequence estimates (numpy or jax arrays), nats.

  nelbo: (B,) negative ELBO per sequence (integral estimate + prior).
  se: (B,) Monte-Carlo standard error of `nelbo` (nan with one sample).
  prior: (B,) prior term included in `nelbo`.
  tokens: (B,) number of scored tokens (the lengths).
  """

  nelbo: Array
  se: Array
  prior: Array
  tokens: Array

  @property
  def per_token(self) -> Array:
    """(B,) negative ELBO per token."""
    return self.nelbo / self.tokens


def _open_uniform(key: Array, shape: tuple[int, ...]) -> Array:
  """Uniform draws in the open interval (0, 1) (never exactly 0 or 1): float32 of `shape`."""
  bits = jax.random.randint(key, shape, 0, 2 ** 23, dtype=jnp.int32)
  return (bits.astype(jnp.float32) + 0.5) / 2.0 ** 23


def sample_times(key: Array, num_samples: int, batch: int, t_sampling: str = "stratified",
                 t_min: float = 0.0) -> Array:
  """Integration times for `num_samples` draws of `batch` sequences: (K, B) in (t_min, 1).

  See the module docstring for the schemes; antithetic needs an even `num_samples`.
  """
  if t_sampling not in T_SAMPLING:
    raise ValueError(f"t_sampling {t_sampling!r} is not one of {T_SAMPLING}")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1; got {num_samples}")
  if not 0.0 <= t_min < 1.0:
    raise ValueError(f"t_min must be in [0, 1); got {t_min}")
  if t_sampling == "antithetic":
    if num_samples % 2:
      raise ValueError(f"antithetic sampling needs an even num_samples; got {num_samples}")
    v = _open_uniform(key, (num_samples // 2, batch))
    v = jnp.stack([v, 1.0 - v], axis=1).reshape(num_samples, batch)
  else:
    v = _open_uniform(key, (num_samples, batch))
    if t_sampling == "stratified":
      v = (jnp.arange(num_samples, dtype=jnp.float32)[:, None] + v) / num_samples
  return t_min + (1.0 - t_min) * v


def prior_term(graph: Graph, noise: Noise, x0: Array, weight: Array) -> Array:
  """KL(p_{1|0}(. | x0) || limit) per sequence: (B,) (0 for absorbing; module docstring).

  Args:
    graph, noise: the diffusion.
    x0: (B, L) clean tokens.
    weight: (B, L) 1 on scored tokens, 0 on padding.
  """
  if graph.absorb:
    return jnp.zeros((x0.shape[0],), jnp.float32)
  d = graph.dim
  s = noise.total_noise(jnp.ones((), jnp.float32))
  p_other = -jnp.expm1(-s) / d
  p_stay = 1.0 - (d - 1) * p_other
  kl = p_stay * jnp.log(p_stay * d) + (d - 1) * p_other * jnp.log(jnp.maximum(p_other * d, 1e-30))
  return kl * jnp.asarray(weight, jnp.float32).sum(axis=-1)


def nelbo(key: Array, log_score_fn: LogScoreFn, graph: Graph, noise: Noise, x0: Array, *,
          lengths: Array | None = None, num_samples: int = 16, t_sampling: str = "stratified",
          t_min: float = 0.0, segment_ids: Array | None = None,
          positions: Array | None = None) -> NelboResult:
  """Monte-Carlo negative ELBO per sequence (jit-able with the callables/ints static).

  Args:
    key: PRNG key (split into the times' key and the corruption's; draw k folds in k).
    log_score_fn: (x (B, L), sigma (B,)[, lengths=(B,)]) -> (B, L, D) LOG score; called with
      `lengths=` only when `lengths` is given (`model_log_score_fn` accepts it).
    graph, noise: the diffusion (as trained).
    x0: (B, L) int clean tokens, padded after `lengths`.
    lengths: (B,) int number of real tokens (None: all L).
    num_samples: draws of t per sequence K.
    t_sampling: "iid" | "stratified" | "antithetic".
    t_min: lower end of the integral (0 = the full bound).
    segment_ids, positions: (B, L) int of packed rows (`sedd_jax.data.pipeline.pack_sequences`):
      the row's sequences share each draw of t (each still an unbiased draw for its sequence;
      their errors are correlated within a row) and `log_score_fn` gets them as keywords.

  Returns:
    NelboResult with (B,) arrays; with `segment_ids`, (B, MAX_SEGMENTS) arrays, one column per
    sequence of the row (tokens 0 where a row holds fewer sequences).
  """
  x0 = jnp.asarray(x0, jnp.int32)
  if x0.ndim != 2:
    raise ValueError(f"x0 must have shape (B, L); got {x0.shape}")
  batch, length = x0.shape
  if lengths is None:
    weight = jnp.ones(x0.shape, jnp.float32)
  else:
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (batch,):
      raise ValueError(f"lengths must have shape (B,) = ({batch},); got {lengths.shape}")
    weight = (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.float32)
  key_t, key_x = jax.random.split(key)
  ts = sample_times(key_t, num_samples, batch, t_sampling, t_min)

  def draw(args):
    k, t = args
    x = _loss.perturb(jax.random.fold_in(key_x, k), graph, noise, x0, t)
    sigma = noise.total_noise(t)
    kw = {} if lengths is None else {"lengths": lengths}
    if segment_ids is not None:
      kw.update(segment_ids=segment_ids, positions=positions)
    log_score = log_score_fn(x, sigma, **kw)
    return _loss.score_entropy_loss(graph, noise, log_score.astype(jnp.float32), x, x0, t,
                                    weight=weight, segment_ids=segment_ids,
                                    num_segments=MAX_SEGMENTS)

  vals = jax.lax.map(draw, (jnp.arange(num_samples), ts)) * (1.0 - t_min)  # (K, B[, S])
  if t_sampling == "antithetic":
    groups = vals.reshape((num_samples // 2, 2) + vals.shape[1:]).mean(axis=1)
  else:
    groups = vals
  n = groups.shape[0]
  se = (jnp.std(groups, axis=0, ddof=1) / jnp.sqrt(n) if n > 1
        else jnp.full(vals.shape[1:], jnp.nan))
  prior = prior_term(graph, noise, x0, weight)
  tokens = weight.sum(axis=-1)
  if segment_ids is not None:  # per sequence: prior and tokens are per-token sums
    per_token_prior = prior / jnp.maximum(tokens, 1.0)
    tokens = _loss.segment_sum(weight, segment_ids, MAX_SEGMENTS)
    prior = per_token_prior[:, None] * tokens
  return NelboResult(nelbo=vals.mean(axis=0) + prior, se=se, prior=prior, tokens=tokens)


def masked_nll(key: Array, log_score_fn: LogScoreFn, graph: Graph, x0: Array, *,
               lengths: Array | None = None, mask_frac: float = 0.15, num_samples: int = 1
               ) -> tuple[Array, Array]:
  """Masked-token negative log-likelihood sums for the pseudo-perplexity (module docstring).

  Args:
    key: PRNG key (draw k of the masks uses fold_in(key, k)).
    log_score_fn: (x (B, L), sigma (B,)[, lengths=(B,)]) -> (B, L, D) LOG score.
    graph: an absorbing graph.
    x0: (B, L) int clean tokens, padded after `lengths`.
    lengths: (B,) number of real tokens (None: all L).
    mask_frac: probability that a token is masked, in (0, 1).
    num_samples: independent mask draws per sequence.

  Returns:
    (nll (B,) summed -log p over the masked tokens of all draws, count (B,) masked tokens).
  """
  if not graph.absorb:
    raise ValueError("masked_nll needs the absorbing graph")
  if not 0.0 < mask_frac < 1.0:
    raise ValueError(f"mask_frac must be in (0, 1); got {mask_frac}")
  x0 = jnp.asarray(x0, jnp.int32)
  if x0.ndim != 2:
    raise ValueError(f"x0 must have shape (B, L); got {x0.shape}")
  batch, length = x0.shape
  valid = jnp.ones(x0.shape, bool)
  if lengths is not None:
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (batch,):
      raise ValueError(f"lengths must have shape (B,) = ({batch},); got {lengths.shape}")
    valid = jnp.arange(length)[None, :] < lengths[:, None]
  sigma = jnp.full((batch,), -math.log1p(-mask_frac), jnp.float32)

  def draw(k):
    masked = jax.random.bernoulli(jax.random.fold_in(key, k), mask_frac, x0.shape) & valid
    x = jnp.where(masked, graph.mask, x0)
    log_score = (log_score_fn(x, sigma) if lengths is None
                 else log_score_fn(x, sigma, lengths=lengths)).astype(jnp.float32)
    logp = jax.nn.log_softmax(log_score[..., :-1], axis=-1)  # (B, L, D - 1)
    nll = -jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0]
    return (jnp.where(masked, nll, 0.0).sum(-1), masked.sum(-1).astype(jnp.float32))

  nll, count = jax.lax.map(draw, jnp.arange(num_samples))
  return nll.sum(0), count.sum(0)


def pseudo_perplexity_summary(nll: np.ndarray, count: np.ndarray, mask_frac: float) -> dict:
  """Data-set pseudo-perplexity from per-sequence `masked_nll` sums: a dict with the masked
  NLL per token (nats and bits), exp of it, the masked-token count and the mask fraction."""
  total = float(np.sum(count))
  if total == 0:
    raise ValueError("no masked tokens: raise the number of draws or mask_frac")
  per_tok = float(np.sum(nll)) / total
  return {"mask_frac": mask_frac, "masked_tokens": int(total),
          "masked_nll_per_token": per_tok, "masked_bits_per_residue": per_tok / math.log(2),
          "pseudo_perplexity": _exp(per_tok)}


def model_log_score_fn(model, lengths: Array | None = None) -> LogScoreFn:
  """Wraps a DDiT as a log-score function in eval mode: (x, sigma, lengths=None,
  **packing) -> (B, L, D); packing = segment_ids=, positions= of packed rows."""
  model.eval()
  default = lengths

  def fn(x, sigma, lengths=None, **packing):
    return model(x, sigma, default if lengths is None else lengths, **packing).astype(
        jnp.float32)

  return fn


def _exp(x: float) -> float:
  """exp(x), inf instead of OverflowError."""
  return math.exp(x) if x < 700 else float("inf")


def summarize(results: Sequence[NelboResult], noise: Noise | None = None) -> dict:
  """Aggregates per-sequence results over a data set (token-weighted).

  Returns a dict: nelbo_per_token (total nelbo / total tokens), bits_per_residue (the same
  / ln 2), se_per_token (MC standard error of that, sqrt(sum se^2) / tokens), perplexity = exp(nelbo_per_token), the same per sequence,
  counts, and `terminal_unmasked_prob` = e^{-sigma(1)} when `noise` is given.
  """
  nel = np.concatenate([np.asarray(r.nelbo, np.float64) for r in results])
  se = np.concatenate([np.asarray(r.se, np.float64) for r in results])
  prior = np.concatenate([np.asarray(r.prior, np.float64) for r in results])
  tok = np.concatenate([np.asarray(r.tokens, np.float64) for r in results])
  total = tok.sum()
  per_tok = nel.sum() / total
  se_tok = math.sqrt(np.sum(se ** 2)) / total
  out = {
      "num_sequences": int(nel.size),
      "num_tokens": int(total),
      "nelbo_per_token": float(per_tok),
      "bits_per_residue": float(per_tok / math.log(2)),
      "se_per_token": float(se_tok),
      "perplexity": _exp(per_tok),
      "perplexity_2se_range": [_exp(per_tok - 2 * se_tok), _exp(per_tok + 2 * se_tok)],
      "nelbo_per_sequence_mean": float(nel.mean()),
      "prior_per_token": float(prior.sum() / total),
  }
  if noise is not None:
    out["terminal_unmasked_prob"] = float(jnp.exp(-noise.total_noise(jnp.float32(1.0))))
  return out


def unigram_baseline(train_tokens: Iterable, eval_tokens: Iterable, vocab: Iterable | None = None
                     ) -> float:
  """Per-token NLL (nats) of `eval_tokens` under add-one-smoothed symbol frequencies of
  `train_tokens`.

  Args:
    train_tokens, eval_tokens: iterables of sequences (strings or 1-D integer arrays, without
      padding); `train_tokens` is read one item at a time (chunks of a token stream do too).
    vocab: the symbols that get the +1 (default: every symbol seen in either set); symbols of
      `eval_tokens` outside `vocab` raise ValueError.

  Returns:
    mean over eval tokens of -log p(token), p(a) = (count_a + 1) / (N + |vocab|).
  """
  def as_array(s):
    return np.asarray(list(s)) if isinstance(s, str) else np.asarray(s).reshape(-1)

  seen: dict = {}  # symbol -> count, one sequence (or chunk) of `train_tokens` at a time
  for s in train_tokens:
    values, n = np.unique(as_array(s), return_counts=True)
    for v, c in zip(values.tolist(), n.tolist()):
      seen[v] = seen.get(v, 0) + c
  parts = [as_array(s) for s in eval_tokens]
  ev = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
  if ev.size == 0:
    raise ValueError("eval_tokens hold no tokens")
  if vocab is None:
    symbols = np.unique(np.concatenate([np.asarray(list(seen)) if seen else ev[:0], ev]))
  else:
    symbols = np.unique(np.asarray(list(vocab)))
  missing = np.setdiff1d(np.unique(ev), symbols)
  if missing.size:
    raise ValueError(f"eval tokens {missing.tolist()[:10]} are not in vocab")
  counts = np.array([seen.get(v, 0) for v in symbols.tolist()], np.float64) + 1.0
  logp = np.log(counts) - np.log(counts.sum())
  return float(-logp[np.searchsorted(symbols, ev)].mean())


def exact_absorbing_log_score_fn(graph: Graph, seqs: np.ndarray, probs: np.ndarray
                                 ) -> LogScoreFn:
  """The exact log score of a finite data distribution under the absorbing graph.

  For a masked position i: s_y = log p0(x^i = y | unmasked tokens of x) - log(e^sigma - 1) for
  y != mask and 0 for the mask column (what the DDiT's `scale_by_sigma` output approximates);
  unmasked positions get 0 everywhere (no score-entropy or reverse-process term uses them).
  A reference for tests (ELBO tightness, sampler distribution), feasible for tiny V^L.

  Args:
    graph: an absorbing graph.
    seqs: (S, L) int all sequences of the support (tokens < graph.tokens).
    probs: (S,) their probabilities (positive, summing to 1).

  Returns:
    log_score_fn(x (B, L), sigma (B,)) -> (B, L, D) float32.
  """
  if not graph.absorb:
    raise ValueError("exact_absorbing_log_score_fn needs the absorbing graph")
  seqs = jnp.asarray(seqs, jnp.int32)
  probs = jnp.asarray(probs, jnp.float32)
  hot = jax.nn.one_hot(seqs, graph.tokens, dtype=jnp.float32)  # (S, L, V)
  mask = graph.mask

  def fn(x, sigma):
    x = jnp.asarray(x, jnp.int32)
    masked = x == mask  # (B, L)
    agree = masked[:, None, :] | (seqs[None, :, :] == x[:, None, :])  # (B, S, L)
    w = probs[None, :] * jnp.all(agree, axis=-1)  # (B, S)
    cond = jnp.einsum("bs,slv->blv", w, hot) / w.sum(axis=-1)[:, None, None]  # (B, L, V)
    esigm1 = jnp.where(sigma < 0.5, jnp.expm1(sigma), jnp.exp(sigma) - 1.0)
    s = jnp.log(jnp.maximum(cond, 1e-30)) - jnp.log(esigm1)[:, None, None]
    s = jnp.concatenate([s, jnp.zeros(s.shape[:2] + (1,), s.dtype)], axis=-1)
    return jnp.where(masked[..., None], s, 0.0)

  return fn
