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
(almost) no mass on `<cls> <pad> <eos> <unk> . - <null_1>`, but a random or poorly trained
model may. `allowed` ((D,) bool) zeroes the score of every other non-mask token: for the
absorbing graph the reverse process conditioned on never unmasking to them, so every generated
token is in `allowed` (for the uniform graph it only removes jumps INTO disallowed tokens). The
protein rule is `sedd_jax.data.tokenizers.residue_mask` (20 standard amino acids; X B U Z O
too with `allow_rare`), used by the CLI, the training samples and the protein-ligand sampler.

Cached variant (`cached=True`, absorbing graph only; as MDLM's cached sampler): while no token
of the batch changes, the previous model output is reused (`lax.cond`), rescaled to the new
noise level: the absorbing score at a masked position is p(y | unmasked) / (e^sigma - 1) (what
`scale_by_sigma` parametrises), so the non-mask columns are multiplied by expm1(sigma_old) /
expm1(sigma_new) and the mask column is kept. For a score of exactly that form (the true score,
a time-independent denoiser) it gives the uncached sampler's tokens for the same key; for a DDiT,
which also conditions on sigma, it is the approximation MDLM and RADD make. The decision is
batch-wide, so caching pays off when steps >> L and batches are small.

First-hitting sampler (`predictor="first_hitting"`, absorbing graph only): one model call per
revealed token at its exact time, no time discretisation (`sedd_jax.sampling.first_hitting`);
`reveal_order="confidence"` reveals the most confident masked position first instead of a
uniform one (the same law for the exact score, another for a learned one; see that module).

Remasking (`remask=eta > 0`, absorbing graph). Analytic: ReMDM's max-capped schedule
(`predictors.remdm_probs`): each step may mask generated tokens again (probability
min(eta, (1 - alpha_s) / alpha_t)), keeping the forward marginals, so a later step can revise
an early token. First-hitting: a remask-and-redraw Gibbs move after each reveal.

Temperature (`temperature=T`, absorbing graph): every score is replaced by `tempered_score`,
which keeps each position's rate of leaving the mask and sharpens the token it reveals to
p(y | unmasked)^(1/T) / Z. T = 1 (the default) is the plain sampler (the same draws for the same
key); T < 1 concentrates each reveal on the model's mode. That is no longer a sample of the
model's distribution: with the exact score and one reveal at a time (first_hitting), sequences
follow the average over reveal orders of the product of the tempered conditionals
(tests/test_sampler.py checks it by brute force).

Categorical draws: `draw="unbiased"` (default) or "reference" (the reference's float32 draw;
see sedd_jax.diffusion.categorical; the parity fixtures use it).

One key per sequence (`row_keyed`, `sample_batched(..., key_per_sequence=True)`, what
`sedd_jax.load(...).sample` uses): `row_keyed(keys)` turns B keys into one key of a PRNG
implementation whose every draw of shape (B, ...) gives row b the bits that keys[b] gives for
shape (...) (fold_in and split act on each row's key). Every draw of the samplers has the batch
as its leading axis, so row b of a batch then follows from keys[b] alone: with sequence n's key
fold_in(key, n), the samples do not depend on the batch size, nor on a sequence's neighbours,
except where the sampler itself couples the rows: `cached` (the reuse decision is batch-wide)
and first_hitting's remasking (a row that has revealed all its tokens keeps remasking while
another row still reveals, so with rows of unequal numbers of generated positions its result
depends on the batch). The model sees each row alone, so its output for a row is the same up
to the float rounding of another batch shape.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Callable

import jax
import jax.extend.random as jax_random_ext
import jax.numpy as jnp
import numpy as np

from sedd_jax.diffusion import categorical as _categorical
from sedd_jax.diffusion import predictors as _predictors
from sedd_jax.diffusion.graph import Graph
from sedd_jax.diffusion.noise import Noise
from sedd_jax.sampling import first_hitting

logger = logging.getLogger(__name__)

Array = jax.Array
ScoreFn = Callable[..., Array]

PREDICTOR_NAMES = ("analytic", "euler", "first_hitting")


def _pad_id() -> int:
  """The `<pad>` id of the protein tokenizer (1 in the ESM-2 alphabet)."""
  from sedd_jax.data.tokenizers import PAD_ID  # here: the sampler needs no data code otherwise
  return int(PAD_ID)


def check_options(graph: Graph, *, steps: int, predictor: str = "analytic", eps: float = 1e-5,
                  cached: bool = False, draw: str = "unbiased", remask: float = 0.0,
                  temperature: float = 1.0, reveal_order: str = "random") -> None:
  """ValueError for sampler options that `sample` cannot run; each message starts with the
  option's name. The one home of these checks: `sample` calls it, and so does the sampling CLI
  before it loads a model (its flags are these options by name: `--` + the message).
  """
  if predictor not in PREDICTOR_NAMES:
    raise ValueError(f"predictor {predictor!r} is not a predictor; choose one of "
                     f"{PREDICTOR_NAMES}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1; got {steps}")
  if not 0.0 < eps < 1.0:
    raise ValueError(f"eps must lie in (0, 1); got {eps}")
  if draw not in _categorical.CATEGORICAL_DRAWS:
    raise ValueError(f"draw {draw!r} is not one of {_categorical.CATEGORICAL_DRAWS}")
  if cached and not graph.absorb:
    raise ValueError("cached needs the absorbing graph (a uniform-graph state never stays "
                     "unchanged)")
  if predictor == "first_hitting" and (not graph.absorb or cached):
    raise ValueError("predictor first_hitting needs the absorbing graph and no cache (it calls "
                     "the model only when a token is revealed)")
  if not 0.0 <= remask <= 1.0:
    raise ValueError(f"remask must be in [0, 1]; got {remask}")
  if remask > 0 and (predictor == "euler" or not graph.absorb):
    raise ValueError(f"remask needs the analytic or first_hitting predictor and the absorbing "
                     f"graph; got predictor {predictor!r}"
                     f"{'' if graph.absorb else ' and the uniform graph'}")
  if not (math.isfinite(temperature) and temperature > 0):
    raise ValueError(f"temperature must be a finite number > 0; got {temperature}")
  if temperature != 1.0 and not graph.absorb:
    raise ValueError("temperature needs the absorbing graph (it sharpens the token a masked "
                     "position reveals)")
  if reveal_order not in first_hitting.REVEAL_ORDERS:
    raise ValueError(f"reveal_order {reveal_order!r} is not one of {first_hitting.REVEAL_ORDERS}")
  if reveal_order != "random" and predictor != "first_hitting":
    raise ValueError(f"reveal_order {reveal_order} needs the first_hitting predictor (one "
                     f"reveal per model call); got predictor {predictor!r}")


def resolve_options(graph: Graph, sampling, *, steps: int | None = None,
                    predictor: str | None = None, eps: float | None = None,
                    **extra) -> tuple[int, str, float]:
  """(steps, predictor, eps): the given values, else those of `sampling` (a config's `sampling`
  block), checked with `extra` (cached=, draw=, remask=, temperature=, reveal_order=) by
  `check_options` (its ValueError)."""
  steps = int(sampling.steps if steps is None else steps)
  predictor = str(predictor or sampling.predictor)
  eps = float(sampling.eps if eps is None else eps)
  check_options(graph, steps=steps, predictor=predictor, eps=eps, **extra)
  return steps, predictor, eps


def _predictor(name: str, draw: str, remask: float):
  """The predictor step `(key, graph, noise, score, x, t, step_size) -> x` of `name` (None for
  first_hitting, which has its own loop)."""
  if name == "first_hitting":
    return None
  if remask > 0:
    return functools.partial(_predictors.remdm_step, eta=remask, draw=draw)
  return functools.partial(_predictors.PREDICTORS[name], draw=draw)


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


def _allowed_mask(allowed, graph: Graph) -> Array | None:
  """`allowed` as a (D,) bool array with the mask column kept (None stays None)."""
  if allowed is None:
    return None
  allowed = jnp.asarray(allowed, dtype=bool)
  if allowed.shape != (graph.dim,):
    raise ValueError(f"allowed must have shape (D,) = ({graph.dim},); got {allowed.shape}")
  return allowed.at[-1].set(True) if graph.absorb else allowed


def tempered_score(score: Array, temperature: float) -> Array:
  """The absorbing-graph score (..., D) (exponentiated; the mask column last) at temperature T:
  each position's non-mask columns s_y become (sum_z s_z) s_y^(1/T) / sum_z s_z^(1/T), so the
  rate of leaving the mask is kept and the revealed token follows p(y | unmasked)^(1/T) / Z.
  Zero columns stay zero; a position without mass is returned unchanged."""
  tokens, mask_col = score[..., :-1], score[..., -1:]
  mass = jnp.sum(tokens, axis=-1, keepdims=True)
  sharp = jax.nn.softmax(jnp.log(tokens) / temperature, axis=-1) * mass
  return jnp.concatenate([jnp.where(mass > 0, sharp, tokens), mask_col], axis=-1)


@functools.lru_cache(maxsize=None)
def _row_impl(base, rows: int):
  """The PRNG implementation of `row_keyed` for `rows` keys of implementation `base`."""
  base_shape = tuple(jax.random.key_data(jax.random.key(0, impl=base)).shape)

  def wrap(data):
    return jax.random.wrap_key_data(data, impl=base)

  def seed(_):
    raise TypeError("row-keyed keys come from sampler.row_keyed(keys), not from a seed")

  def split(data, shape):  # (rows, *key) -> (*shape, rows, *key)
    out = jax.vmap(lambda d: jax.random.key_data(jax.random.split(wrap(d), shape)))(data)
    return jnp.moveaxis(out, 0, len(shape))

  def fold_in(data, value):
    return jax.vmap(lambda d: jax.random.key_data(jax.random.fold_in(wrap(d), value)))(data)

  def random_bits(data, bit_width, shape):
    if not shape or shape[0] != rows:
      raise ValueError(f"a row-keyed key of {rows} rows draws arrays of leading dimension "
                       f"{rows}; got shape {tuple(shape)}")
    dtype = jnp.dtype(f"uint{bit_width}")
    return jax.vmap(lambda d: jax.random.bits(wrap(d), tuple(shape[1:]), dtype))(data)

  return jax_random_ext.define_prng_impl(
      key_shape=(rows, *base_shape), seed=seed, split=split, random_bits=random_bits,
      fold_in=fold_in, name=f"rows{rows}[{base}]", tag=f"rows{rows}")


def row_keyed(keys: Array) -> Array:
  """One key that draws row b of every (B, ...) draw from `keys[b]` (module docstring).

  Args:
    keys: (B,) typed PRNG keys (`jax.random.key`), one per row.

  Returns:
    a () key: jax.random.bits(row_keyed(keys), (B, *s))[b] == jax.random.bits(keys[b], s),
    the same for every other jax.random draw, fold_in and split; a draw whose leading
    dimension is not B raises ValueError.
  """
  keys = jnp.asarray(keys)
  if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) or keys.ndim != 1:
    raise ValueError(f"keys must be a (B,) array of typed PRNG keys (jax.random.key); got "
                     f"{keys.dtype} {keys.shape}")
  impl = _row_impl(jax.random.key_impl(keys), int(keys.shape[0]))
  return jax.random.wrap_key_data(jax.random.key_data(keys), impl=impl)


def sequence_keys(key: Array, index: np.ndarray) -> Array:
  """(n,) keys fold_in(key, i) of the sequences `index` (n,) int: sequence i's own key."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(index, jnp.uint32))


def sample(key: Array, score_fn: ScoreFn, graph: Graph, noise: Noise, shape: tuple[int, int], *,
           steps: int, predictor: str = "analytic", eps: float = 1e-5,
           fixed_tokens: Array | None = None, fixed_mask: Array | None = None,
           lengths: Array | None = None, cached: bool = False, allowed: Array | None = None,
           pad_id: int | None = None, return_nfe: bool = False, draw: str = "unbiased",
           remask: float = 0.0, temperature: float = 1.0, reveal_order: str = "random"):
  """Draws a batch of sequences by running the whole reverse process.

  Jit-able as one program with `score_fn`, `graph`, `noise`, `shape`, `steps`, `predictor`,
  `eps`, `cached`, `pad_id`, `draw`, `remask`, `temperature` and `reveal_order` static (see
  `jit_sampler`).

  Args:
    key: PRNG key; step i uses fold_in(key, i), the denoise step fold_in(key, steps), the
      limit draw fold_in(key, steps + 1). A `row_keyed` key gives each row its own key.
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
    temperature: T > 0 of `tempered_score` (absorbing graph; module docstring); 1 (default) =
      the model's own distribution.
    reveal_order: "random" (default) or "confidence" (first_hitting only; module docstring).

  Returns:
    (B, L) int32 tokens (and the call count if `return_nfe`).
  """
  if len(shape) != 2:
    raise ValueError(f"shape must be (B, L); got {shape}")
  check_options(graph, steps=steps, predictor=predictor, eps=eps, cached=cached, draw=draw,
                remask=remask, temperature=temperature, reveal_order=reveal_order)
  _check_conditioning(shape, fixed_tokens, fixed_mask, lengths)
  allowed = _allowed_mask(allowed, graph)
  pad_id = _pad_id() if pad_id is None else pad_id

  def score_at(x, sigma):
    score = score_fn(x, sigma) if lengths is None else score_fn(x, sigma, lengths=lengths)
    if allowed is not None:
      score = jnp.where(allowed, score, jnp.zeros_like(score))
    return score if temperature == 1.0 else tempered_score(score, temperature)

  def proj(x):
    return x if fixed_tokens is None else _predictors.project(x, fixed_tokens, fixed_mask)

  valid = jnp.ones(shape, dtype=bool) if lengths is None else (
      jnp.arange(shape[1])[None, :] < jnp.asarray(lengths)[:, None])  # (B, L)
  x = graph.sample_limit(jax.random.fold_in(key, steps + 1), shape).astype(jnp.int32)
  if predictor == "first_hitting":
    generated = valid if fixed_mask is None else valid & ~jnp.broadcast_to(
        jnp.asarray(fixed_mask, bool), shape)
    x, nfe = first_hitting.first_hitting_loop(key, score_at, proj, graph, noise, x, valid,
                                              generated, eps, draw, remask, reveal_order)
  else:
    loop = functools.partial(_cached_loop, valid=valid) if cached else _reverse_loop
    step_fn = _predictor(predictor, draw, remask)
    x, score, nfe = loop(key, score_at, proj, step_fn, graph, noise, x, steps, eps)
    t_final = jnp.full((shape[0],), eps, dtype=jnp.float32)
    x = _predictors.denoise_step(jax.random.fold_in(key, steps), graph, noise, score, x,
                                 t_final, draw=draw)
    x = proj(x)
  x = jnp.where(valid, x, jnp.int32(pad_id)).astype(jnp.int32)
  return (x, nfe) if return_nfe else x


def _reverse_loop(key, score_at, proj, step_fn, graph, noise, x, steps, eps):
  """`steps` predictor steps from t = 1 under one `lax.fori_loop`, then the projected x (B, L)
  and its score (B, L, D) at t = eps. Returns (x, score, number of score calls)."""
  batch = x.shape[0]
  step_size = (1.0 - eps) / steps

  def body(i, carry):
    x, nfe = carry
    t = jnp.full((batch,), 1.0 - i * step_size, dtype=jnp.float32)
    x = proj(x)
    score = score_at(x, noise.total_noise(t))
    return step_fn(jax.random.fold_in(key, i), graph, noise, score, x, t, step_size), nfe + 1

  x, nfe = jax.lax.fori_loop(0, steps, body, (x, jnp.int32(0)))
  x = proj(x)
  score = score_at(x, noise.total_noise(jnp.full((batch,), eps, dtype=jnp.float32)))
  return x, score, nfe + 1


def _cached_loop(key, score_at, proj, step_fn, graph, noise, x, steps, eps, *, valid):
  """`_reverse_loop` reusing the previous score, rescaled to the new sigma, while no token
  changed where `valid` (B, L) (module docstring)."""
  batch = x.shape[0]
  step_size = (1.0 - eps) / steps
  t_final = jnp.full((batch,), eps, dtype=jnp.float32)
  score_struct = jax.eval_shape(score_at, x, t_final)

  def cached_score(x, sigma, prev_x, prev_score, prev_sigma, nfe):
    def fresh(_):
      return score_at(x, sigma).astype(score_struct.dtype), nfe + 1

    def reuse(_):
      ratio = (jnp.expm1(prev_sigma) / jnp.expm1(sigma))[:, None, None]  # (B, 1, 1)
      scaled = prev_score * ratio.astype(prev_score.dtype)
      return scaled.at[..., -1].set(prev_score[..., -1]), nfe

    return jax.lax.cond(jnp.any((x != prev_x) & valid), fresh, reuse, None)

  def body(i, carry):
    x, prev_x, prev_score, prev_sigma, nfe = carry
    t = jnp.full((batch,), 1.0 - i * step_size, dtype=jnp.float32)
    sigma = noise.total_noise(t)
    x = proj(x)
    score, nfe = cached_score(x, sigma, prev_x, prev_score, prev_sigma, nfe)
    new_x = step_fn(jax.random.fold_in(key, i), graph, noise, score, x, t, step_size)
    return new_x, x, score, sigma, nfe

  init = (x, jnp.full(x.shape, -1, dtype=jnp.int32),
          jnp.zeros(score_struct.shape, score_struct.dtype),
          jnp.ones((batch,), jnp.float32), jnp.int32(0))
  x, prev_x, prev_score, prev_sigma, nfe = jax.lax.fori_loop(0, steps, body, init)
  x = proj(x)
  score, nfe = cached_score(x, noise.total_noise(t_final), prev_x, prev_score, prev_sigma, nfe)
  return x, score, nfe


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
                draw: str = "unbiased", remask: float = 0.0, temperature: float = 1.0,
                reveal_order: str = "random"):
  """One compiled sampler for a fixed shape.

  Exactly one of `model` (an nnx DDiT in eval mode, split: its weights are inputs of the
  compiled program, not constants) or `score_fn` (closed over). `compiler_options` go to XLA
  (e.g. {"xla_backend_optimization_level": 0} compiles 3x faster on the CPU, for tests).

  Returns:
    run(key, fixed_tokens, fixed_mask, lengths, allowed) -> (B, L) int32 (and nfe if
    `return_nfe`); pass None for unused conditioning (each None/array pattern compiles once).
  """
  if (model is None) == (score_fn is None):
    raise ValueError("give exactly one of model and score_fn")
  static = dict(steps=steps, predictor=predictor, eps=eps, cached=cached, pad_id=pad_id,
                return_nfe=return_nfe, draw=draw, remask=remask, temperature=temperature,
                reveal_order=reveal_order)
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
                   draw: str = "unbiased", remask: float = 0.0,
                   temperature: float = 1.0, reveal_order: str = "random",
                   key_per_sequence: bool = False, cache: dict | None = None) -> np.ndarray:
  """Draws `num` sequences of length `length` in chunks of `batch_size` (one compiled program).

  Chunk c uses fold_in(key, c); the last chunk is padded to `batch_size` and trimmed, so the
  output depends on (key, batch_size) but not on `num` beyond the chunks it covers. With
  `key_per_sequence`, sequence n is drawn from its own key fold_in(key, n) (`row_keyed`), so
  it does not depend on `batch_size` either (but see the module docstring for `cached` and
  first_hitting's remasking).

  Args:
    key: PRNG key.
    graph, noise: the diffusion.
    num: number of sequences N.
    length: L (the model's maximum, or the longest requested length).
    batch_size: sequences per compiled call.
    steps, predictor, eps, cached, allowed, pad_id, draw, remask, temperature, reveal_order: as
      `sample`.
    model / score_fn: exactly one (see `jit_sampler`).
    fixed_tokens, fixed_mask: (L,) shared by all, or (N, L) per sequence.
    lengths: (N,) int lengths (None: all `length`).
    progress: log each chunk with its speed.
    compiler_options: passed to XLA (see `jit_sampler`).
    key_per_sequence: one key per sequence (above) instead of one per chunk.
    cache: a dict the caller keeps to reuse the compiled sampler of `model` in later calls of
      the same shape and options (the weights are read at each call); None: compile anew.

  Returns:
    (N, L) int32 numpy array.
  """
  if batch_size < 1 or num < 0:
    raise ValueError(f"need batch_size >= 1 and num >= 0; got {batch_size}, {num}")
  batch_size = min(batch_size, max(num, 1))
  options = dict(steps=steps, predictor=predictor, eps=eps, cached=cached, pad_id=pad_id,
                 return_nfe=True, compiler_options=compiler_options, draw=draw, remask=remask,
                 temperature=temperature, reveal_order=reveal_order)
  cache_key = state = None
  if cache is not None and model is not None:
    from flax import nnx

    model.eval()
    graphdef, state = nnx.split(model)
    cache_key = (graphdef, graph, noise, batch_size, length, *(
        tuple(sorted(v.items())) if isinstance(v, dict) else v for v in options.values()))
  if cache_key is not None and cache_key in cache:
    run = functools.partial(cache[cache_key], state)
  else:
    run = jit_sampler(graph, noise, (batch_size, length), model=model, score_fn=score_fn,
                      **options)
    if cache_key is not None:
      cache[cache_key] = run.func  # the compiled program; its first argument is the weights
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

    ft, fm = (take(fixed_tokens), take(fixed_mask)) if per_seq else (fixed_tokens, fixed_mask)
    ln = take(lengths) if lengths is not None else None
    chunk_key = (row_keyed(sequence_keys(key, take(np.arange(num)))) if key_per_sequence
                 else jax.random.fold_in(key, c))
    t0 = time.perf_counter()
    x, nfe = run(chunk_key, ft, fm, ln, allowed)
    out[lo:hi] = np.asarray(jax.device_get(x))[:hi - lo]
    if progress:
      dt = time.perf_counter() - t0
      logger.info("batch %d/%d: %d sequences in %.2f s (%.2f seq/s; %d model calls; %d done, "
                  "%.1f s total)", c + 1, chunks, hi - lo, dt, (hi - lo) / max(dt, 1e-9),
                  int(nfe), hi, time.perf_counter() - start)
  return out
