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

Scoring a list of sequences (`score_sequences` -> `SequenceScores`, the evaluate CLI's
estimator): residue strings or id arrays are checked (`encode_sequences`), laid out in rows
(`sequence_rows`: packed, or one per row), run `batch_size` rows at a time (`row_batches`) and
estimated by `nelbo_draws`: every sequence gets the same times t_k (`draw_times`) and its own
corruption, drawn token by token from (seed, draw, sequence index, position)
(`perturb_per_position`), so the numbers do not depend on the batching or the packing. Model
calls are compiled once per model structure, options and row shape (`jit_with_model`).
`draw_mean_se` is the mean and standard error of draws (antithetic pairs first).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Callable, Iterable, Mapping, Sequence

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
  kw = {} if lengths is None else {"lengths": lengths}
  if segment_ids is not None:
    kw.update(segment_ids=segment_ids, positions=positions)
  vals = _loss_draws(
      log_score_fn, graph, noise, x0, ts,
      lambda k, t: _loss.perturb(jax.random.fold_in(key_x, k), graph, noise, x0, t), weight, kw,
      segment_ids, MAX_SEGMENTS) * (1.0 - t_min)  # (K, B[, S])
  mean, se = draw_mean_se(vals, t_sampling, jnp)
  prior = prior_term(graph, noise, x0, weight)
  tokens = weight.sum(axis=-1)
  if segment_ids is not None:  # per sequence: prior and tokens are per-token sums
    per_token_prior = prior / jnp.maximum(tokens, 1.0)
    tokens = _loss.segment_sum(weight, segment_ids, MAX_SEGMENTS)
    prior = per_token_prior[:, None] * tokens
  return NelboResult(nelbo=mean + prior, se=se, prior=prior, tokens=tokens)


def _loss_draws(log_score_fn: LogScoreFn, graph: Graph, noise: Noise, x0: Array, ts: Array,
                corrupt: Callable[[Array, Array], Array], weight: Array, model_kw: dict,
                segment_ids: Array | None, num_segments: int) -> Array:
  """The integrand at each draw: (K, B) losses (K, B, num_segments with `segment_ids`).

  Args:
    ts: (K, B) times; draw k corrupts x0 by `corrupt(k, ts[k])` -> (B, L) and calls
      `log_score_fn(x, sigma(t), **model_kw)`.
    weight: (B, L) 1 on scored tokens.
  """
  def draw(args):
    k, t = args
    x = corrupt(k, t)
    log_score = log_score_fn(x, noise.total_noise(t), **model_kw)
    return _loss.score_entropy_loss(graph, noise, log_score.astype(jnp.float32), x, x0, t,
                                    weight=weight, segment_ids=segment_ids,
                                    num_segments=num_segments)

  return jax.lax.map(draw, (jnp.arange(ts.shape[0]), ts))


def draw_mean_se(vals, t_sampling: str, xp=np):
  """(mean, Monte-Carlo standard error) over axis 0 of the draws `vals` (K, ...) of times from
  `sample_times(..., t_sampling)`, as the module docstring: antithetic pairs (draws 2j, 2j + 1)
  are averaged first; the SE is nan with one group. `xp`: numpy or jax.numpy."""
  k = vals.shape[0]
  groups = vals.reshape((k // 2, 2) + vals.shape[1:]).mean(axis=1) if (
      t_sampling == "antithetic") else vals
  n = groups.shape[0]
  se = (xp.std(groups, axis=0, ddof=1) / math.sqrt(n) if n > 1
        else xp.full(vals.shape[1:], xp.nan))
  return vals.mean(axis=0), se


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
  """Wraps a DDiT (or any callable with its signature; put in eval mode when it has `eval`) as
  a log-score function: (x, sigma, lengths=None, **packing) -> (B, L, D) float32; packing =
  segment_ids=, positions= of packed rows."""
  if hasattr(model, "eval"):
    model.eval()
  default = lengths

  def fn(x, sigma, lengths=None, **packing):
    return model(x, sigma, default if lengths is None else lengths, **packing).astype(
        jnp.float32)

  return fn


def _exp(x: float) -> float:
  """exp(x), inf instead of OverflowError."""
  return math.exp(x) if x < 700 else float("inf")


def summarize(results: Sequence[NelboResult], noise: Noise | None = None, *,
              total_se: float | None = None) -> dict:
  """Aggregates per-sequence results over a data set (token-weighted).

  Returns a dict: nelbo_per_token (total nelbo / total tokens), bits_per_residue (the same
  / ln 2), se_per_token (MC standard error of that: `total_se` / tokens, `total_se` being the
  standard error of the summed nelbo, default sqrt(sum se^2) for independent errors; give
  `SequenceScores.total_se` for `score_sequences`' results, whose draws of t are shared),
  perplexity = exp(nelbo_per_token), the same per sequence, counts, and
  `terminal_unmasked_prob` = e^{-sigma(1)} when `noise` is given.
  """
  nel = np.concatenate([np.asarray(r.nelbo, np.float64) for r in results])
  se = np.concatenate([np.asarray(r.se, np.float64) for r in results])
  prior = np.concatenate([np.asarray(r.prior, np.float64) for r in results])
  tok = np.concatenate([np.asarray(r.tokens, np.float64) for r in results])
  total = tok.sum()
  per_tok = nel.sum() / total
  se_tok = (math.sqrt(np.sum(se ** 2)) if total_se is None else total_se) / total
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


def _symbols(s) -> np.ndarray:
  """A sequence (string or integer array) as a 1-D array of its symbols."""
  return np.asarray(list(s)) if isinstance(s, str) else np.asarray(s).reshape(-1)


def unigram_baseline(train_tokens: Iterable, eval_tokens: Iterable, vocab: Iterable | None = None
                     ) -> float:
  """Per-token NLL (nats) of `eval_tokens` under add-one-smoothed symbol frequencies of
  `train_tokens` (`unigram_baseline_from_counts` of their symbol counts).

  Args:
    train_tokens, eval_tokens: iterables of sequences (strings or 1-D integer arrays, without
      padding); `train_tokens` is read one item at a time (chunks of a token stream do too).
    vocab: the symbols that get the +1 (default: every symbol seen in either set); symbols of
      `eval_tokens` outside `vocab` raise ValueError.

  Returns:
    mean over eval tokens of -log p(token), p(a) = (count_a + 1) / (N + |vocab|).
  """
  seen: dict = {}  # symbol -> count, one sequence (or chunk) of `train_tokens` at a time
  for s in train_tokens:
    values, n = np.unique(_symbols(s), return_counts=True)
    for v, c in zip(values.tolist(), n.tolist()):
      seen[v] = seen.get(v, 0) + c
  return unigram_baseline_from_counts(seen, eval_tokens, vocab=vocab)


def unigram_baseline_from_counts(train_counts: Mapping, eval_tokens: Iterable,
                                 vocab: Iterable | None = None) -> float:
  """`unigram_baseline` from the training symbols' counts (an exported bundle's token counts).

  Args:
    train_counts: {symbol: count >= 0} of the training tokens (symbols absent count 0).
    eval_tokens: iterable of sequences (strings or 1-D integer arrays, without padding).
    vocab: the symbols that get the +1 (default: every key of `train_counts` with a count > 0
      and every symbol of `eval_tokens`); symbols of `eval_tokens` outside it raise ValueError.

  Returns:
    mean over eval tokens of -log p(token), p(a) = (count_a + 1) / (N + |vocab|).
  """
  if any(int(c) < 0 for c in train_counts.values()):
    raise ValueError("train_counts must be counts >= 0")
  parts = [_symbols(s) for s in eval_tokens]
  ev = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
  if ev.size == 0:
    raise ValueError("eval_tokens hold no tokens")
  if vocab is None:
    seen = [v for v, c in train_counts.items() if c > 0]
    symbols = np.unique(np.concatenate([np.asarray(seen) if seen else ev[:0], ev]))
  else:
    symbols = np.unique(np.asarray(list(vocab)))
  missing = np.setdiff1d(np.unique(ev), symbols)
  if missing.size:
    raise ValueError(f"eval tokens {missing.tolist()[:10]} are not in vocab")
  counts = np.array([train_counts.get(v, 0) for v in symbols.tolist()], np.float64) + 1.0
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


# ---- scoring lists of sequences (the library home of the evaluate CLI's estimator) ----


def encode_sequences(seqs: Sequence[str] | Sequence[np.ndarray], *, max_length: int,
                     vocab_size: int, name: str = "seqs") -> list[np.ndarray]:
  """Residue strings (ESM-2 letters, `ProteinTokenizer`) or token-id arrays (L_i,) without
  padding -> int32 id arrays, checked: ValueError naming `{name}[i]` for an unknown letter (and
  its column), an id outside [0, vocab_size), an empty sequence or one longer than max_length
  (never cropped)."""
  from sedd_jax.data import tokenizers  # pylint: disable=g-import-not-at-top

  if isinstance(seqs, (str, np.ndarray)):
    raise ValueError(f"{name} must be a sequence of sequences (strings or 1-D id arrays); got "
                     f"{type(seqs).__name__}")
  if len(seqs) == 0:
    raise ValueError(f"{name} is empty")
  tok = tokenizers.ProteinTokenizer()
  out = []
  for i, s in enumerate(seqs):
    if isinstance(s, str):
      try:
        ids = tok.encode(s)
      except tokenizers.TokenizeError as e:
        raise ValueError(f"{name}[{i}]: {e}") from None
    else:
      ids = np.asarray(s)
      if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name}[{i}] must be a residue string or a 1-D integer id array; got "
                         f"shape {ids.shape} dtype {ids.dtype}")
      bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
      if bad.size:
        raise ValueError(f"{name}[{i}] holds id {int(ids[bad[0]])} at position {bad[0] + 1}; "
                         f"ids must be in [0, {vocab_size})")
      ids = ids.astype(np.int32)
    if ids.size == 0:
      raise ValueError(f"{name}[{i}] is empty")
    if ids.size > max_length:
      raise ValueError(f"{name}[{i}] has length {ids.size} > max_length {max_length} (the "
                       f"model's length); crop or split it")
    out.append(ids)
  return out


def sequence_rows(seqs: Sequence[np.ndarray], max_length: int, pack: bool
                  ) -> dict[str, np.ndarray]:
  """The model rows of `seqs` (id arrays, each at most max_length long): packed with
  `pipeline.pack_sequences` into rows as wide as the longest sequence or MAX_SEGMENTS
  mean-length sequences (a multiple of 8, at most max_length), or one sequence per row of the
  longest sequence's width (`pack=False`).

  Returns:
    {"tokens", "segment_ids", "positions": (R, W) int32 ("segment_ids" 1 on the real tokens
    and "positions" 0..W-1 without packing), "lengths": (R,) int32, "index": (R, S) int64:
    the position in `seqs` of segment s + 1 of row r, -1 for none (S = MAX_SEGMENTS packed,
    1 otherwise)}.
  """
  from sedd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from sedd_jax.data import reference  # pylint: disable=g-import-not-at-top

  longest = max(len(s) for s in seqs)
  if not pack:
    tokens, lengths = reference.pad_tokens(list(seqs), longest)  # <pad> after each sequence
    positions = np.broadcast_to(np.arange(longest, dtype=np.int32), tokens.shape)
    return {"tokens": tokens, "lengths": lengths,
            "segment_ids": (positions < lengths[:, None]).astype(np.int32),
            "positions": np.array(positions), "index": np.arange(len(seqs))[:, None]}
  mean = sum(len(s) for s in seqs) / len(seqs)
  width = min(max_length, max(longest, -(-math.ceil(MAX_SEGMENTS * mean) // 8) * 8))
  return pipeline.pack_sequences(seqs, width)


def row_batches(rows: dict[str, np.ndarray], batch_size: int):
  """Yields (batch, index) for consecutive groups of `batch_size` rows of `sequence_rows`:
  batch = its arrays, always `batch_size` rows (the last group is filled up with repeated rows,
  so that one compiled shape serves all), index (b, S) the sequences of the b real rows."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}")
  n = len(rows["index"])
  for lo in range(0, n, batch_size):
    take = np.resize(np.arange(lo, min(n, lo + batch_size)), batch_size)
    yield ({k: v[take] for k, v in rows.items() if k != "index"},
           rows["index"][lo:min(n, lo + batch_size)])


def token_values(rows: dict[str, np.ndarray], values: np.ndarray) -> np.ndarray:
  """(R, W) int32: `values[i]` ((N,) int, one per sequence) at each token of sequence i in
  `sequence_rows` rows (on padding, that of the row's first sequence: padding is never
  scored)."""
  seq_of = np.take_along_axis(rows["index"], np.maximum(rows["segment_ids"] - 1, 0), 1)
  return np.asarray(values, np.int64)[seq_of].astype(np.int32)


def perturb_per_position(key: Array, graph: Graph, noise: Noise, x0: Array, t: Array,
                         streams: Array, positions: Array, force: Array | None = None
                         ) -> Array:
  """x ~ p_{t|0}(. | x0) (as `loss.perturb`), each token drawn by `graph.sample_transition`
  from the key fold_in(fold_in(key, stream), position) alone: a sequence's corruption does not
  depend on its row, its neighbours in a packed row or the batch. In the absorbing graph the
  token's draw is a uniform compared with 1 - e^{-sigma}, so two sequences of one stream and
  one t (a wild type and its variant) are masked at the same positions.

  Args:
    key: PRNG key.
    x0: (B, L) int clean tokens.
    t: (B,) times.
    streams: (B, L) int the stream (e.g. the sequence's index) of each token.
    positions: (B, L) int each token's position within its sequence.
    force: optional (B, L) int (absorbing graph): 1 = mask the token, 0 = keep it clean, -1 =
      draw it (the other tokens' draws are unchanged).

  Returns:
    (B, L) int32 tokens.
  """
  x0 = jnp.asarray(x0, jnp.int32)
  t = jnp.asarray(t, jnp.float32)
  if x0.ndim != 2 or t.shape != x0.shape[:1]:
    raise ValueError(f"x0 must be (B, L) and t (B,); got {x0.shape} and {t.shape}")
  for name, a in (("streams", streams), ("positions", positions), ("force", force)):
    if a is not None and jnp.shape(a) != x0.shape:
      raise ValueError(f"{name} must have x0's shape {x0.shape}; got {jnp.shape(a)}")
  sigma = noise.total_noise(t)  # (B,)
  keys = jax.vmap(jax.vmap(lambda s, p: jax.random.fold_in(jax.random.fold_in(key, s), p)))(
      jnp.asarray(streams, jnp.int32), jnp.asarray(positions, jnp.int32))

  def one(k, token, s):
    return graph.sample_transition(k, token[None, None], s[None])[0, 0]

  x = jax.vmap(jax.vmap(one, in_axes=(0, 0, None)))(keys, x0, sigma)
  if force is None:
    return x
  if not graph.absorb:
    raise ValueError("force needs the absorbing graph")
  return jnp.where(force == 1, graph.mask, jnp.where(force == 0, x0, x)).astype(jnp.int32)


def jit_with_model(model, fn: Callable, static) -> Callable:
  """`run(*args)` = jax.jit of `fn(model, static, *args)` with `model` in eval mode: an
  nnx.Module enters as its state (an argument, not constants baked into the program), any
  other callable as a static argument; `static` (hashable) is static too. `fn` should be a
  module-level function: the compiled programs are cached on (fn, the model's structure,
  static, the argument shapes), so a second call with the same model and options compiles
  nothing."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  if hasattr(model, "eval"):
    model.eval()
  if not isinstance(model, nnx.Module):
    run = _jitted(fn, None)
    return lambda *args: run(model, static, *args)
  graphdef, state = nnx.split(model)
  run = _jitted(fn, graphdef)
  return lambda *args: run(state, static, *args)


@functools.lru_cache(maxsize=32)
def _jitted(fn: Callable, graphdef) -> Callable:
  """The jitted `fn` of `jit_with_model` for a model structure (None: a plain callable)."""
  if graphdef is None:
    return jax.jit(fn, static_argnums=(0, 1))
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return jax.jit(lambda state, static, *args: fn(nnx.merge(graphdef, state), static, *args),
                 static_argnums=1)


def draw_times(seed: int, num_samples: int, t_sampling: str, t_min: float = 0.0) -> Array:
  """The (K,) times t_k that `nelbo_draws` gives every sequence for `seed`."""
  return sample_times(jax.random.split(jax.random.key(seed))[0], num_samples, 1, t_sampling,
                      t_min)[:, 0]


def nelbo_draws(model, graph: Graph, noise: Noise, seqs: Sequence[np.ndarray],
                streams: np.ndarray, *, max_length: int, num_samples: int, seed: int,
                batch_size: int, t_sampling: str, t_min: float = 0.0, pack: bool = True,
                force_position: np.ndarray | None = None,
                force_masked: np.ndarray | None = None) -> np.ndarray:
  """The integrand's draws (N, K) float64 of each sequence (without the prior term; times
  1 - t_min), in `seqs` order.

  Draw k of every sequence is at the same time t_k (`draw_times`: key(seed) split into the
  times' key and the corruption's; packed rows share t, so a time per sequence could not be
  packing-independent), its tokens corrupted by `perturb_per_position` on the sequence's
  stream `streams[i]`: the numbers do not depend on batch_size or packing. Distinct streams
  give independent corruptions; a shared stream gives sequences of equal length the same mask
  pattern.

  Args:
    model: a DDiT or a callable with its signature (`model(x, sigma, lengths,
      segment_ids=, positions=)` -> log score; called with the packing keywords only when
      `pack`).
    seqs: N checked id arrays (`encode_sequences`).
    streams: (N,) int.
    force_position, force_masked: optional (N,) int / bool (absorbing graph): sequence i's
      token at 0-based position force_position[i] (-1: none) is masked (True) or kept clean
      (False) at every draw, the other tokens drawn as without it (`perturb_per_position`).
    others: as `score_sequences`.
  """
  ts = draw_times(seed, num_samples, t_sampling, t_min)  # (K,); checks the options
  if len(streams) != len(seqs):
    raise ValueError(f"streams must have one entry per sequence ({len(seqs)}); got "
                     f"{len(streams)}")
  rows = sequence_rows(seqs, max_length, pack)
  rows["streams"] = token_values(rows, streams)
  if force_position is not None:
    at = token_values(rows, force_position) == rows["positions"]
    rows["force"] = np.where(at & (rows["segment_ids"] > 0),
                             token_values(rows, np.asarray(force_masked, np.int64)), -1)
  run = jit_with_model(model, _draws_kernel,
                       (graph, noise, pack, rows["index"].shape[1], float(t_min)))
  key_x = jax.random.split(jax.random.key(seed))[1]
  out = np.full((len(seqs), num_samples), np.nan)
  for batch, index in row_batches(rows, batch_size):
    vals = np.asarray(jax.device_get(run(key_x, ts, batch)), np.float64)[:, :len(index)]
    real = index >= 0
    out[index[real]] = vals[:, real].T
  return out


def _draws_kernel(model, static: tuple, key_x: Array, ts: Array, batch: dict) -> Array:
  """`nelbo_draws`' compiled part: (K, B, S) integrand draws of a batch of rows at times
  ts (K,); static = (graph, noise, pack, S, t_min)."""
  graph, noise, pack, num_segments, t_min = static
  seg, pos = batch["segment_ids"], batch["positions"]
  kw = {"lengths": batch["lengths"]}
  if pack:
    kw.update(segment_ids=seg, positions=pos)
  return _loss_draws(
      model_log_score_fn(model), graph, noise, batch["tokens"],
      jnp.broadcast_to(ts[:, None], (ts.shape[0], seg.shape[0])),
      lambda k, t: perturb_per_position(jax.random.fold_in(key_x, k), graph, noise,
                                        batch["tokens"], t, batch["streams"], pos,
                                        batch.get("force")),
      (seg > 0).astype(jnp.float32), kw, seg, num_segments) * (1.0 - t_min)


@dataclasses.dataclass(frozen=True)
class SequenceScores:
  """`score_sequences`' per-sequence estimates, nats (numpy arrays, in input order).

  nelbo: (N,) float64 negative ELBO (an upper bound on -log p) of each sequence.
  nelbo_se: (N,) its Monte-Carlo standard error over the draws (nan with one group of draws).
  per_residue, per_residue_se: (N,) the same divided by the length.
  length: (N,) int residues.
  prior: (N,) the prior term included in nelbo (0 for the absorbing graph).
  total_se: the standard error of nelbo.sum() over the draws; the sequences share the draws
    of t, so their errors are correlated and this, not sqrt(sum nelbo_se^2), is the data-set
    error (`summarize(..., total_se=)`).
  provenance: how it was computed (the API fills it: source, checkpoint step, settings, seed).
  """

  nelbo: np.ndarray
  nelbo_se: np.ndarray
  per_residue: np.ndarray
  per_residue_se: np.ndarray
  length: np.ndarray
  prior: np.ndarray
  total_se: float
  provenance: dict = dataclasses.field(default_factory=dict, compare=False)

  def to_nelbo_result(self) -> NelboResult:
    """The same numbers as a NelboResult (tokens = length) for `summarize`."""
    return NelboResult(nelbo=self.nelbo, se=self.nelbo_se, prior=self.prior,
                       tokens=self.length.astype(np.float64))


def score_sequences(model, graph: Graph, noise: Noise,
                    seqs: Sequence[str] | Sequence[np.ndarray], *, max_length: int,
                    num_samples: int = 16, seed: int = 0, batch_size: int = 64,
                    t_sampling: str = "antithetic", pack: bool = True,
                    t_min: float = 0.0) -> SequenceScores:
  """The negative ELBO of each sequence (`nelbo`'s estimator; module docstring), in batches of
  `batch_size` rows of one compiled shape.

  Every sequence gets the same `num_samples` times t_k (iid | stratified | antithetic from
  `seed`) and its own corruption of each draw (keyed by its index i: `perturb_per_position`),
  so a sequence's numbers depend on the sequence and its index i only, not on batch_size,
  packing (`pack`: several sequences per row, `sequence_rows`) or the other sequences (to float
  rounding of the model: 1e-5 in float32); shared times also make differences between
  sequences less noisy (common random numbers), at the price of correlated errors
  (`SequenceScores.total_se` is the data-set error that accounts for it). The first call
  with a model compiles (once per row shape); later calls with the same model structure and
  options reuse the programs (`jit_with_model`).

  Args:
    model: a DDiT, or any callable with its signature (`nelbo_draws`).
    graph, noise: the diffusion the model was trained with.
    seqs: residue strings (ESM-2 letters, case-folded, a trailing '*' stripped) or token-id
      arrays (L_i,) without padding (`encode_sequences`: bad input is a ValueError naming
      seqs[i]; longer than max_length is refused, never cropped).
    max_length: the model's length (cfg.model.length).
    num_samples: draws of t per sequence K (even for antithetic).
    seed: the draws' seed.
    batch_size: rows per compiled call.
    t_sampling: "iid" | "stratified" | "antithetic".
    pack: several sequences per row (False: one sequence per row of the longest's width).
    t_min: lower end of the t integral (0 = the full bound).
  """
  x0 = encode_sequences(seqs, max_length=max_length, vocab_size=graph.tokens)
  draws = nelbo_draws(model, graph, noise, x0, np.arange(len(x0)), max_length=max_length,
                      num_samples=num_samples, seed=seed, batch_size=batch_size,
                      t_sampling=t_sampling, t_min=t_min, pack=pack)  # (N, K)
  length = np.array([len(s) for s in x0])
  prior = float(prior_term(graph, noise, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1)))[0]
                ) * length  # the per-token KL does not depend on the token
  mean, se = draw_mean_se(draws.T, t_sampling)
  total_se = float(draw_mean_se(draws.sum(axis=0), t_sampling)[1])
  return SequenceScores(nelbo=mean + prior, nelbo_se=se, per_residue=(mean + prior) / length,
                        per_residue_se=se / length, length=length, prior=prior,
                        total_se=total_se)
