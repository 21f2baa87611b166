"""The full reverse (sampling) process of SEDD under one `lax.fori_loop`, with conditioning.

As the reference's `pc_sampler`: start from the limit (all `<mask>` for the absorbing graph,
uniform tokens for the uniform graph), go from t = 1 to t = eps in `steps` equal steps of
`(1 - eps) / steps`, one predictor step (euler or analytic) per iteration with the fixed
(conditioning) positions overwritten before every step, then a final denoise step at t = eps
(which drops the mask column, so no `<mask>` is left with the absorbing graph) followed by one
last projection. Step i draws its randomness from `jax.random.fold_in(key, i)`.

Score functions: `score_fn(x (B, L) int32, sigma (B,) float32) -> (B, L, D)` returns the
EXPONENTIATED model output (the reference's `get_score_fn(..., sampling=True)`); when `lengths`
is given to `sample`, it is called as `score_fn(x, sigma, lengths=lengths)` (`model_score_fn`
accepts that).

Which tokens come out: the denoise step never emits the mask. A trained protein model puts
(almost) no mass on `<cls> <pad> <eos> <unk> . - <null_1>` (they never occur inside training
sequences, and padding is excluded from the loss), but a random or poorly trained model may.
`allowed` ((D,) bool) zeroes the score of every other non-mask token, which for the absorbing
graph is the reverse process conditioned on never unmasking to them: then every generated
token is in `allowed`. Which protein residues may be generated is one rule,
`sedd_jax.data.tokenizers.residue_mask` (the 20 standard amino acids; X B U Z O too with
`allow_rare`), used by the sampling CLI, the samples drawn during training and the
protein-ligand sampler. For the uniform graph `allowed` only removes jumps INTO disallowed
tokens.

Cached variant (`cached=True`, absorbing graph only; as MDLM's cached sampler): if no token of
the batch changed since the model was last called, the previous output is reused instead of
calling the model, inside the loop through `lax.cond`. The output is rescaled to the new noise
level: the absorbing score at a masked position is p(y | unmasked) / (e^sigma - 1) (what the
DDiT's `scale_by_sigma` parametrises), so the non-mask columns are multiplied by
expm1(sigma_old) / expm1(sigma_new) and the mask column is kept. For a score function that is
exactly of that form (the true score, or a time-independent denoiser) the cached sampler gives
the same tokens as the uncached one for the same key; for a DDiT, which also conditions on
sigma, reusing its output over a step is the approximation MDLM and RADD make (a trained model
is close to time-independent given its input). The decision is batch-wide (one changed token
anywhere forces a model call), so caching pays off when steps >> L and batches are small.

First-hitting sampler (`predictor="first_hitting"`, absorbing graph only; Zheng et al. 2024,
"Masked diffusion models are secretly time-agnostic masked models"): under the absorbing
forward process each token is masked independently, with probability m(t) = 1 - e^{-sigma(t)}
at time t, so going backwards a masked token is revealed at its own time, with
P(still masked at s | masked at t) = m(s) / m(t). With n masked tokens at time t, the next
reveal happens at the latest of n such times: m(tau) = m(t) u^{1/n}, u ~ U(0, 1); the revealed
position is uniform among the masked ones and its token is drawn from the model's conditional
p(y | unmasked) (the normalised non-mask columns of the score at sigma(tau), clamped at
sigma(eps)). Nothing else happens between reveals, so the model is called once per revealed
token (n calls in all, whatever `steps` says) and the process has no time-discretisation error:
with the exact score the samples follow the data distribution exactly (tests/test_sampler.py).
Each sequence of the batch has its own clock (sigma is (B,)); the loop runs while any sequence
has a masked position (fixed and padded positions are never masked), so the call count is the
largest number of generated positions in the batch. Random numbers: reveal k uses
fold_in(key, k).

Remasking (`remask=eta > 0`, absorbing graph). Analytic predictor: ReMDM's max-capped
schedule, `predictors.remdm_probs`: every step may mask generated tokens again (probability
min(eta, (1 - alpha_s) / alpha_t)) while more masks are unmasked, so each position's marginals
stay those of the forward process and a later step can revise an early token. First-hitting:
after each reveal at sigma, each sequence with probability eta masks one generated token
(uniform among them; never a fixed one) and redraws it from the model at the same sigma. With
the exact score that is a Gibbs move on the revealed tokens given the mask pattern, so the
sampler stays exact at any eta; it costs one more model call per reveal when any sequence of
the batch remasks (`lax.cond`), so up to 2 L calls.

Categorical draws: `draw="unbiased"` (default) or "reference" (the reference's float32 draw;
see sedd_jax.diffusion.categorical; the parity fixtures use it).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sedd_jax.diffusion import categorical as _categorical
from sedd_jax.diffusion import predictors as _predictors
from sedd_jax.diffusion.graph import Graph
from sedd_jax.diffusion.noise import Noise

logger = logging.getLogger(__name__)

Array = jax.Array
ScoreFn = Callable[..., Array]

PREDICTOR_NAMES = ("analytic", "euler", "first_hitting")


def _pad_id() -> int:
  """The `<pad>` id of the protein tokenizer (1 in the ESM-2 alphabet)."""
  try:
    from sedd_jax.data.tokenizers import PAD_ID
    return int(PAD_ID)
  except ImportError:  # pragma: no cover - the data package is part of the project
    return 1


def _predictor(name: str, draw: str, remask: float):
  steps = {"analytic": _predictors.analytic_step, "euler": _predictors.euler_step}
  if name not in PREDICTOR_NAMES:
    raise ValueError(f"predictor {name!r} is not a predictor; choose one of {PREDICTOR_NAMES}")
  if draw not in _categorical.CATEGORICAL_DRAWS:
    raise ValueError(f"draw {draw!r} is not one of {_categorical.CATEGORICAL_DRAWS}")
  if not 0.0 <= remask <= 1.0:
    raise ValueError(f"remask must be in [0, 1]; got {remask}")
  if remask > 0:
    if name == "euler":
      raise ValueError("remask needs the analytic or first_hitting predictor; got 'euler'")
    if name == "analytic":
      return functools.partial(_predictors.remdm_step, eta=remask, draw=draw)
  return functools.partial(steps[name], draw=draw) if name in steps else None


def _token_at(key: Array, score: Array, pos: Array, draw: str) -> Array:
  """(B,) int32 token drawn from the non-mask columns of `score` (B, L, D) at `pos` (B,)."""
  probs = jnp.take_along_axis(score, pos[:, None, None], axis=1)[:, 0, :-1]  # (B, D - 1)
  return _categorical.sample_categorical(key, probs, draw)


def first_hitting_reveal(key: Array, score: Array, masked: Array, draw: str
                         ) -> tuple[Array, Array]:
  """What one reveal of the first-hitting sampler unmasks (see the module docstring).

  Args:
    key: PRNG key.
    score: (B, L, D) exponentiated score at the reveal time (its last column is the mask).
    masked: (B, L) bool, positions still to generate.
    draw: categorical draw ("unbiased" or "reference").

  Returns:
    (position (B,) int32 uniform among the masked ones, token (B,) int32 drawn from the
    non-mask columns of the score there). Rows without a masked position get position 0.
  """
  k_pos, k_tok = jax.random.split(key)
  pos = _categorical.sample_categorical(k_pos, masked.astype(jnp.float32), draw)
  return pos, _token_at(k_tok, score, pos, draw)


def next_reveal_log_m(key: Array, log_m: Array, n: Array) -> Array:
  """log m(tau) of the next reveal among n masked tokens: log m(t) + log(u) / n, (B,)."""
  u = jax.random.uniform(key, log_m.shape, jnp.float32, minval=jnp.finfo(jnp.float32).tiny)
  return log_m + jnp.log(u) / jnp.maximum(n, 1).astype(jnp.float32)


def _check_conditioning(shape, fixed_tokens, fixed_mask, lengths):
  batch, length = shape
  if (fixed_tokens is None) != (fixed_mask is None):
    raise ValueError("fixed_tokens and fixed_mask must be given together")
  if fixed_tokens is not None:
    for name, a in (("fixed_tokens", fixed_tokens), ("fixed_mask", fixed_mask)):
      if jnp.ndim(a) not in (1, 2) or jnp.shape(a)[-1] != length or (
          jnp.ndim(a) == 2 and jnp.shape(a)[0] not in (1, batch)):
        raise ValueError(f"{name} must have shape (L,) or (B, L) with (B, L) = {shape}; "
                         f"got {jnp.shape(a)}")
  if lengths is not None and jnp.shape(lengths) != (batch,):
    raise ValueError(f"lengths must have shape (B,) = ({batch},); got {jnp.shape(lengths)}")


def sample(key: Array, score_fn: ScoreFn, graph: Graph, noise: Noise, shape: tuple[int, int], *,
           steps: int, predictor: str = "analytic", eps: float = 1e-5,
           fixed_tokens: Array | None = None, fixed_mask: Array | None = None,
           lengths: Array | None = None, cached: bool = False, allowed: Array | None = None,
           pad_id: int | None = None, return_nfe: bool = False, draw: str = "unbiased",
           remask: float = 0.0):
  """Draws a batch of sequences by running the whole reverse process.

  Jit-able as one program with `score_fn`, `graph`, `noise`, `shape`, `steps`, `predictor`,
  `eps`, `cached` and `pad_id` static (see `jit_sampler`).

  Args:
    key: PRNG key; step i uses fold_in(key, i), the denoise step fold_in(key, steps), the
      limit draw fold_in(key, steps + 1).
    score_fn: (x (B, L), sigma (B,)[, lengths=(B,)]) -> (B, L, D) exponentiated score.
    graph: the diffusion graph (D = graph.dim).
    noise: the noise schedule.
    shape: (B, L).
    steps: number of predictor steps (>= 1; not used by "first_hitting").
    predictor: "analytic", "euler" or "first_hitting" (absorbing graph; module docstring).
    eps: final time; step_size = (1 - eps) / steps.
    fixed_tokens: (L,) or (B, L) int tokens kept where `fixed_mask` is True.
    fixed_mask: (L,) or (B, L) bool.
    lengths: (B,) int32 sequence lengths; positions >= lengths come back as `pad_id` and are
      ignored by the cache's change test; passed on to `score_fn(..., lengths=lengths)`.
    cached: reuse the model output while no token changes (absorbing graph only).
    allowed: (D,) bool, tokens that may be generated (see the module docstring); the mask
      column is always kept.
    pad_id: token written at positions >= lengths (default: the tokenizer's `<pad>`, 1).
    return_nfe: also return the number of score-function calls (int32 scalar).
    draw: "unbiased" (default) or "reference" categorical draws.
    remask: remasking probability eta in [0, 1] (absorbing graph; module docstring): the
      ReMDM cap for "analytic", the corrector probability for "first_hitting"; 0 (default) =
      no remasking.

  Returns:
    (B, L) int32 tokens (and the call count if `return_nfe`).
  """
  if len(shape) != 2:
    raise ValueError(f"shape must be (B, L); got {shape}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1; got {steps}")
  if cached and not graph.absorb:
    raise ValueError("cached sampling needs the absorbing graph (a uniform-graph state never "
                     "stays unchanged)")
  _check_conditioning(shape, fixed_tokens, fixed_mask, lengths)
  step_fn = _predictor(predictor, draw, remask)
  if predictor == "first_hitting" and (not graph.absorb or cached):
    raise ValueError("the first_hitting predictor needs the absorbing graph and no cache (it "
                     "calls the model only when a token is revealed)")
  batch, length = shape
  step_size = (1.0 - eps) / steps
  pad_id = _pad_id() if pad_id is None else pad_id

  if allowed is not None:
    allowed = jnp.asarray(allowed, dtype=bool)
    if allowed.shape != (graph.dim,):
      raise ValueError(f"allowed must have shape (D,) = ({graph.dim},); got {allowed.shape}")
    if graph.absorb:
      allowed = allowed.at[-1].set(True)

  def score_at(x, sigma):
    score = score_fn(x, sigma) if lengths is None else score_fn(x, sigma, lengths=lengths)
    if allowed is not None:
      score = jnp.where(allowed, score, jnp.zeros_like(score))
    return score

  def proj(x):
    if fixed_tokens is None:
      return x
    return _predictors.project(x, fixed_tokens, fixed_mask)

  if lengths is not None:
    valid = jnp.arange(length)[None, :] < jnp.asarray(lengths)[:, None]  # (B, L)
  else:
    valid = jnp.ones(shape, dtype=bool)

  x = graph.sample_limit(jax.random.fold_in(key, steps + 1), shape).astype(jnp.int32)
  t_final = jnp.full((batch,), eps, dtype=jnp.float32)

  if predictor == "first_hitting":
    generated = valid if fixed_mask is None else valid & ~jnp.broadcast_to(
        jnp.asarray(fixed_mask, bool), shape)
    x, nfe = _first_hitting_loop(key, score_at, proj, graph, noise, x, valid, generated, eps,
                                 draw, remask)
    x = jnp.where(valid, x, jnp.int32(pad_id)).astype(jnp.int32)
    return (x, nfe) if return_nfe else x

  if not cached:
    def body(i, carry):
      x, nfe = carry
      t = jnp.full((batch,), 1.0 - i * step_size, dtype=jnp.float32)
      x = proj(x)
      score = score_at(x, noise.total_noise(t))
      return step_fn(jax.random.fold_in(key, i), graph, noise, score, x, t, step_size), nfe + 1

    x, nfe = jax.lax.fori_loop(0, steps, body, (x, jnp.int32(0)))
    x = proj(x)
    score = score_at(x, noise.total_noise(t_final))
    nfe = nfe + 1
  else:
    score_struct = jax.eval_shape(score_at, x, t_final)

    def cached_score(x, sigma, prev_x, prev_score, prev_sigma, nfe):
      changed = jnp.any((x != prev_x) & valid)

      def fresh(_):
        return score_at(x, sigma).astype(score_struct.dtype), nfe + 1

      def reuse(_):
        ratio = (jnp.expm1(prev_sigma) / jnp.expm1(sigma))[:, None, None]  # (B, 1, 1)
        scaled = prev_score * ratio.astype(prev_score.dtype)
        return scaled.at[..., -1].set(prev_score[..., -1]), nfe

      return jax.lax.cond(changed, fresh, reuse, None)

    def body(i, carry):
      x, prev_x, prev_score, prev_sigma, nfe = carry
      t = jnp.full((batch,), 1.0 - i * step_size, dtype=jnp.float32)
      sigma = noise.total_noise(t)
      x = proj(x)
      score, nfe = cached_score(x, sigma, prev_x, prev_score, prev_sigma, nfe)
      new_x = step_fn(jax.random.fold_in(key, i), graph, noise, score, x, t, step_size)
      return new_x, x, score, sigma, nfe

    init = (x, jnp.full(shape, -1, dtype=jnp.int32),
            jnp.zeros(score_struct.shape, score_struct.dtype),
            jnp.ones((batch,), jnp.float32), jnp.int32(0))
    x, prev_x, prev_score, prev_sigma, nfe = jax.lax.fori_loop(0, steps, body, init)
    x = proj(x)
    score, nfe = cached_score(x, noise.total_noise(t_final), prev_x, prev_score, prev_sigma, nfe)

  x = _predictors.denoise_step(jax.random.fold_in(key, steps), graph, noise, score, x, t_final,
                               draw=draw)
  x = proj(x)
  x = jnp.where(valid, x, jnp.int32(pad_id)).astype(jnp.int32)
  return (x, nfe) if return_nfe else x


def _first_hitting_loop(key, score_at, proj, graph, noise, x, valid, generated, eps, draw,
                        remask):
  """The first-hitting reveals (module docstring) under one `lax.while_loop`, each followed by
  the remasking corrector when `remask` > 0. `generated` (B, L): positions it may remask.

  Returns (x (B, L) int32 with every valid position revealed, number of model calls)."""
  batch = x.shape[0]
  row = jnp.arange(batch)
  x = proj(x)
  log_m = jnp.log(-jnp.expm1(-noise.total_noise(jnp.ones((batch,), jnp.float32))))
  sigma_min = noise.total_noise(jnp.full((batch,), eps, jnp.float32))

  def masked_of(x):
    return (x == graph.mask) & valid

  def corrector(key, x, sigma, nfe):
    """Remask one generated token (probability `remask` per sequence) and redraw it from the
    model at the same sigma: a Gibbs move that keeps the state's distribution."""
    cand = generated & (x != graph.mask)
    do = (jax.random.uniform(jax.random.fold_in(key, 0), (batch,)) < remask) & cand.any(-1)
    pos = _categorical.sample_categorical(jax.random.fold_in(key, 1),
                                          cand.astype(jnp.float32), draw)

    def call(x):
      xm = x.at[row, pos].set(jnp.where(do, graph.mask, x[row, pos]))
      token = _token_at(jax.random.fold_in(key, 2), score_at(xm, sigma), pos, draw)
      return x.at[row, pos].set(jnp.where(do, token, x[row, pos])), nfe + 1

    return jax.lax.cond(jnp.any(do), call, lambda x: (x, nfe), x)

  def cond(carry):
    return jnp.any(masked_of(carry[0]))

  def body(carry):
    x, log_m, k, nfe = carry
    masked = masked_of(x)
    n = masked.sum(axis=-1)  # (B,)
    key_k = jax.random.fold_in(key, k)
    new_log_m = next_reveal_log_m(jax.random.fold_in(key_k, 0), log_m, n)
    sigma = jnp.maximum(-jnp.log1p(-jnp.exp(new_log_m)), sigma_min)
    pos, token = first_hitting_reveal(jax.random.fold_in(key_k, 1), score_at(x, sigma), masked,
                                      draw)
    active = n > 0
    x = x.at[row, pos].set(jnp.where(active, token, x[row, pos]))
    if remask > 0:
      x, nfe = corrector(jax.random.fold_in(key_k, 2), x, sigma, nfe)
    return x, jnp.where(active, new_log_m, log_m), k + 1, nfe + 1

  x, _, _, nfe = jax.lax.while_loop(cond, body, (x, log_m, jnp.int32(0), jnp.int32(0)))
  return x, nfe


def model_score_fn(model, lengths: Array | None = None) -> ScoreFn:
  """Wraps a DDiT as a sampling score function (eval mode, exp of the log score, float32).

  Args:
    model: a `sedd_jax.model.DDiT` (`model(x, sigma, lengths) -> (B, L, D)` log score); it is
      switched to eval mode (no dropout).
    lengths: optional (B,) lengths baked in; a `lengths=` keyword at call time overrides them.

  Returns:
    score_fn(x (B, L), sigma (B,), lengths=None) -> (B, L, D) float32.
  """
  model.eval()
  default = lengths

  def score_fn(x, sigma, lengths=None):
    ln = default if lengths is None else lengths
    return jnp.exp(model(x, sigma, ln).astype(jnp.float32))

  return score_fn


def sample_model(model, key: Array, graph: Graph, noise: Noise, shape: tuple[int, int],
                 **kwargs):
  """`sample` with `model_score_fn(model)`; under jit, pass the model's state as an input
  (`nnx.split` / `nnx.merge`, as `jit_sampler` does) so that the weights are not constants."""
  return sample(key, model_score_fn(model), graph, noise, shape, **kwargs)


def jit_sampler(graph: Graph, noise: Noise, shape: tuple[int, int], *, steps: int,
                predictor: str = "analytic", eps: float = 1e-5, cached: bool = False,
                model=None, score_fn: ScoreFn | None = None, pad_id: int | None = None,
                return_nfe: bool = False, compiler_options: dict | None = None,
                draw: str = "unbiased", remask: float = 0.0):
  """One compiled sampler for a fixed shape.

  Exactly one of `model` (an nnx DDiT, switched to eval mode and split: its weights are inputs
  of the compiled program, not baked-in constants) or
  `score_fn` (compiled with `jax.jit`, closed over). `compiler_options` go to XLA (e.g.
  {"xla_backend_optimization_level": 0} compiles 3x faster on the CPU, for tests).

  Returns:
    run(key, fixed_tokens, fixed_mask, lengths, allowed) -> (B, L) int32 (and nfe if
    `return_nfe`); pass None for unused conditioning (each None/array pattern compiles once).
  """
  if (model is None) == (score_fn is None):
    raise ValueError("give exactly one of model and score_fn")
  static = dict(steps=steps, predictor=predictor, eps=eps, cached=cached, pad_id=pad_id,
                return_nfe=return_nfe, draw=draw, remask=remask)
  if model is not None:
    from flax import nnx

    model.eval()
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def run_model(state, key, fixed_tokens, fixed_mask, lengths, allowed):
      return sample_model(nnx.merge(graphdef, state), key, graph, noise, shape,
                          fixed_tokens=fixed_tokens, fixed_mask=fixed_mask, lengths=lengths,
                          allowed=allowed, **static)

    return functools.partial(run_model, state)

  @functools.partial(jax.jit, compiler_options=compiler_options)
  def run_fn(key, fixed_tokens, fixed_mask, lengths, allowed):
    return sample(key, score_fn, graph, noise, shape, fixed_tokens=fixed_tokens,
                  fixed_mask=fixed_mask, lengths=lengths, allowed=allowed, **static)

  return run_fn


def sample_batched(key: Array, graph: Graph, noise: Noise, num: int, length: int, *,
                   batch_size: int, steps: int, predictor: str = "analytic", eps: float = 1e-5,
                   model=None, score_fn: ScoreFn | None = None,
                   fixed_tokens: np.ndarray | None = None, fixed_mask: np.ndarray | None = None,
                   lengths: np.ndarray | None = None, cached: bool = False,
                   allowed: np.ndarray | None = None, pad_id: int | None = None,
                   progress: bool = True, compiler_options: dict | None = None,
                   draw: str = "unbiased", remask: float = 0.0) -> np.ndarray:
  """Draws `num` sequences of length `length` in chunks of `batch_size` (one compiled program).

  Chunk c uses fold_in(key, c); the last chunk is padded to `batch_size` and trimmed, so the
  output depends on (key, batch_size) but not on `num` beyond the chunks it covers.

  Args:
    key: PRNG key.
    graph, noise: the diffusion.
    num: number of sequences N.
    length: L (the model's maximum, or the longest requested length).
    batch_size: sequences per compiled call.
    steps, predictor, eps, cached, allowed, pad_id, draw, remask: as `sample`.
    model / score_fn: exactly one (see `jit_sampler`).
    fixed_tokens, fixed_mask: (L,) shared by all, or (N, L) per sequence.
    lengths: (N,) int lengths (None: all `length`).
    progress: log each chunk with its speed.
    compiler_options: passed to XLA (see `jit_sampler`).

  Returns:
    (N, L) int32 numpy array.
  """
  if batch_size < 1 or num < 0:
    raise ValueError(f"need batch_size >= 1 and num >= 0; got {batch_size}, {num}")
  batch_size = min(batch_size, max(num, 1))
  run = jit_sampler(graph, noise, (batch_size, length), steps=steps, predictor=predictor,
                    eps=eps, cached=cached, model=model, score_fn=score_fn, pad_id=pad_id,
                    return_nfe=True, compiler_options=compiler_options, draw=draw,
                    remask=remask)
  per_seq = fixed_tokens is not None and np.ndim(fixed_tokens) == 2
  if lengths is not None:
    lengths = np.asarray(lengths, dtype=np.int32)
    if lengths.shape != (num,):
      raise ValueError(f"lengths must have shape (N,) = ({num},); got {lengths.shape}")
  chunks = math.ceil(num / batch_size)
  out = np.zeros((num, length), dtype=np.int32)
  start = time.perf_counter()
  for c in range(chunks):
    lo, hi = c * batch_size, min(num, (c + 1) * batch_size)

    def take(a):
      a = np.asarray(a[lo:hi])
      return np.concatenate([a, np.repeat(a[-1:], batch_size - (hi - lo), axis=0)])

    ft, fm = fixed_tokens, fixed_mask
    if per_seq:
      ft, fm = take(np.asarray(fixed_tokens)), take(np.asarray(fixed_mask))
    ln = take(lengths) if lengths is not None else None
    t0 = time.perf_counter()
    x, nfe = run(jax.random.fold_in(key, c), ft, fm, ln, allowed)
    out[lo:hi] = np.asarray(jax.device_get(x))[:hi - lo]
    if progress:
      dt = time.perf_counter() - t0
      logger.info("batch %d/%d: %d sequences in %.2f s (%.2f seq/s; %d model calls; %d done, "
                  "%.1f s total)", c + 1, chunks, hi - lo, dt, (hi - lo) / max(dt, 1e-9),
                  int(nfe), hi, time.perf_counter() - start)
  return out
