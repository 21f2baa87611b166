"""The jit-compiled train and eval steps, device mesh and shardings.

Devices: one 1-D mesh `('data',)` over all devices (`jax.make_mesh`); batches are sharded over
`data` on their first axis; parameters, EMA and optimizer moments are replicated, or with
`cfg.training.fsdp` sharded fsdp-style (each array's largest axis divisible by the device count
is split over `data`; arrays with none stay replicated). XLA inserts the collectives; no pmap.

Train step (pure; `state` donated):

  step_key = fold_in(state.rng, state.step); k_t, k_x, k_drop = split(step_key, 3)
  t = curriculum.sample_time(k_t, B, step)          (B,)  for the whole global batch
  row_keys = split(k_x, B)                          (B,)  one corruption key per sequence
  for each of `accum` micro-batches (lax.scan; sequences j*accum + a form micro-batch a, so a
  micro-batch is spread evenly over the devices):
    x = perturb(row_keys[r], x0[r], t[r]) per row   (mb, L)
    log_score = model(x, sigma(t) * loss_scale, lengths)   dropout stream = fold_in(k_drop, a)
    loss_a = mean over the micro-batch of score_entropy_loss(..., weight = arange(L) < lengths)
  loss = mean_a loss_a, grads = mean_a grads_a

Because t and the corruption keys are drawn per sequence of the global batch, the loss does not
depend on `accum` or on the number of devices (up to float summation order).

Loss normalisation: as the reference, a per-sequence SUM over real positions, then the MEAN over
sequences (not divided by the number of tokens). `loss_per_token` (sum / real tokens) is reported
as a metric too.

Non-finite loss or gradient norm: params, optimizer state and EMA stay as they were; `step`
advances (the batch is consumed), `bad_steps` (consecutive) and `skipped` (total) count it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sedd_jax import diffusion
from sedd_jax.training.state import ModelDefs
from sedd_jax.training.state import TrainState
from sedd_jax.training.state import ema_decay
from sedd_jax.training.state import ema_update
from sedd_jax.training.state import make_schedule

Array = jax.Array
AXIS = "data"
BATCH_KEYS = ("tokens", "lengths")


# ----------------------------------------------------------------------------------------------
# Mesh and shardings.


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh ('data',) over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
  """PartitionSpec splitting the largest axis divisible by n over 'data' (P() if none)."""
  if n <= 1 or not shape:
    return P()
  best = None
  for axis, size in enumerate(shape):
    if size % n == 0 and size >= n and (best is None or size > shape[best]):
      best = axis
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = AXIS
  return P(*spec)


def param_shardings(mesh: jax.sharding.Mesh, tree: Any, fsdp: bool) -> Any:
  """NamedShardings for a parameter-shaped tree: replicated, or `fsdp_spec` per array."""
  n = mesh.shape[AXIS]

  def one(x):
    shape = tuple(getattr(x, "shape", ()))
    return NamedSharding(mesh, fsdp_spec(shape, n) if fsdp else P())

  return jax.tree.map(one, tree)


def state_shardings(mesh: jax.sharding.Mesh, state: TrainState, fsdp: bool) -> TrainState:
  """Shardings for a TrainState (or its abstract `jax.eval_shape` twin)."""
  rep = NamedSharding(mesh, P())
  return TrainState(
    step=rep,
    params=param_shardings(mesh, state.params, fsdp),
    opt_state=param_shardings(mesh, state.opt_state, fsdp),
    ema=param_shardings(mesh, state.ema, fsdp),
    rng=rep,
    bad_steps=rep,
    skipped=rep,
  )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of a batch array: first axis over 'data'."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: jax.sharding.Mesh, tree: Any) -> Any:
  """Replicated shardings for every leaf of `tree`."""
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, Array]:
  """This process's rows of a batch -> global arrays sharded over 'data' (works multi-host)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in BATCH_KEYS}


# ----------------------------------------------------------------------------------------------
# Loss.


def draw_noise(key: Array, batch: int, step: Array, curriculum: diffusion.Curriculum,
               time_eps: float) -> tuple[Array, Array, Array, Array, Array]:
  """Per-sequence randomness of a step for the whole global batch.

  Returns (t (B,), row_keys (B, 2) uint32, dropout key, corruption scale (), loss scale ()).
  """
  k_t, k_x, k_drop = jax.random.split(key, 3)
  t = curriculum.sample_time(k_t, batch, step, eps=time_eps)
  row_keys = jax.random.split(k_x, batch)
  corrupt_scale, loss_scale = curriculum.sigma_scales(step)
  return t, row_keys, k_drop, corrupt_scale, loss_scale


def sequence_losses(model: nnx.Module, graph, noise, tokens: Array, lengths: Array, t: Array,
                    row_keys: Array, corrupt_scale: Array, loss_scale: Array) -> Array:
  """Score-entropy loss per sequence.

  Args:
    model: a DDiT (already in train or eval mode).
    graph, noise: the diffusion graph and noise schedule.
    tokens: (B, L) int32 clean tokens; lengths: (B,) int32 real lengths (padding after).
    t: (B,) float32 times; row_keys: (B, 2) uint32 corruption keys, one per sequence.
    corrupt_scale, loss_scale: () float32 curriculum factors on sigma.

  Returns:
    (B,) float32: sum over positions < length of dsigma * score entropy.
  """
  tokens = tokens.astype(jnp.int32)
  lengths = lengths.astype(jnp.int32)

  def one(k, x0, ti):
    return diffusion.perturb(k, graph, noise, x0[None], ti[None], sigma_scale=corrupt_scale)[0]

  x = jax.vmap(one)(row_keys, tokens, t)
  sigma = noise.total_noise(t) * loss_scale
  log_score = model(x, sigma, lengths)
  weight = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
  return diffusion.score_entropy_loss(graph, noise, log_score.astype(jnp.float32), x, tokens, t,
                                      weight, sigma_scale=loss_scale)


def _micro_batches(x: Array, accum: int) -> Array:
  """(B, ...) -> (accum, B / accum, ...): micro-batch a holds rows j * accum + a."""
  b = x.shape[0]
  y = x.reshape((b // accum, accum) + x.shape[1:])
  y = jnp.swapaxes(y, 0, 1)
  return y


# ----------------------------------------------------------------------------------------------
# Train step.


def make_grad_fn(cfg: ml_collections.ConfigDict, graph, noise, defs: ModelDefs,
                 mesh: jax.sharding.Mesh) -> Callable:
  """The pure `loss_and_grads(params, rest, batch, step, rng) -> (loss, loss_sum, grads)`.

  loss: () mean over the global batch of the per-sequence loss; loss_sum: () its sum; grads: the
  gradient of `loss` (shaped like params), accumulated over `cfg.training.accum` micro-batches.
  `step` () int32 and `rng` (2,) uint32 pick the randomness (see the module docstring).
  """
  accum = int(cfg.training.accum)
  time_eps = float(cfg.training.time_eps)
  curriculum = diffusion.get_curriculum(cfg.curriculum)
  use_dropout = float(cfg.model.dropout) > 0

  def reseeded(params, rest, drop_key):
    """`rest` with the dropout streams reset to `drop_key` (done outside the grad trace)."""
    if not use_dropout:
      return rest
    model = nnx.merge(defs.train, params, rest)
    nnx.reseed(model, dropout=drop_key)
    return nnx.split(model, nnx.Param, ...)[2]

  def loss_fn(params, rest, tokens, lengths, t, row_keys, corrupt_scale, loss_scale):
    # Fresh Variables at this trace level (dropout advances its RngCount while running).
    rest = jax.tree.map(lambda x: x, rest)
    model = nnx.merge(defs.train, params, rest)
    per_seq = sequence_losses(model, graph, noise, tokens, lengths, t,
                              jax.random.wrap_key_data(row_keys), corrupt_scale, loss_scale)
    return per_seq.mean(), per_seq.sum()

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def loss_and_grads(params, rest, batch, step, rng):
    tokens, lengths = batch["tokens"], batch["lengths"]
    b = tokens.shape[0]
    if b % accum:
      raise ValueError(f"batch {b} is not divisible by training.accum = {accum}")
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    t, row_keys, k_drop, cs, ls = draw_noise(key, b, step, curriculum, time_eps)
    row_keys = jax.random.key_data(row_keys)  # (B, 2) uint32
    if accum == 1:
      r = reseeded(params, rest, jax.random.fold_in(k_drop, 0))
      (loss, loss_sum), grads = grad_fn(params, r, tokens, lengths, t, row_keys, cs, ls)
      return loss, loss_sum, grads
    mbs = [_micro_batches(a, accum) for a in (tokens, lengths, t, row_keys)]
    mbs = [jax.lax.with_sharding_constraint(
      a, NamedSharding(mesh, P(*((None, AXIS) + (None,) * (a.ndim - 2))))) for a in mbs]

    def body(carry, xs):
      g_acc, l_acc, s_acc = carry
      a, tok, ln, tt, rk = xs
      r = reseeded(params, rest, jax.random.fold_in(k_drop, a))
      (l, s), g = grad_fn(params, r, tok, ln, tt, rk, cs, ls)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, s_acc + s), None

    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32))
    (grads, loss, loss_sum), _ = jax.lax.scan(body, init, (jnp.arange(accum), *mbs))
    return loss / accum, loss_sum, jax.tree.map(lambda g: g / accum, grads)

  return loss_and_grads


def make_train_step(cfg: ml_collections.ConfigDict, graph, noise, defs: ModelDefs,
                    optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    state_sharding: TrainState, rest: Any,
                    compiler_options: dict | None = None) -> Callable:
  """Builds the jitted `train_step(state, rest, batch) -> (state, metrics)`.

  `state` is donated. `batch` is {'tokens': (B, L) int32, 'lengths': (B,) int32} sharded over
  'data' (B = cfg.training.batch_size). metrics: scalars loss, loss_per_token, grad_norm, lr,
  finite (bool), bad_steps, skipped, tokens (real tokens in the batch). `compiler_options` go
  to XLA (tests pass {"xla_backend_optimization_level": 0} to compile faster on the CPU).
  """
  decay = float(cfg.training.ema)
  schedule = make_schedule(cfg)
  loss_and_grads = make_grad_fn(cfg, graph, noise, defs, mesh)

  def step_fn(state: TrainState, rest, batch):
    lengths = batch["lengths"]
    loss, loss_sum, grads = loss_and_grads(state.params, rest, batch, state.step, state.rng)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Zero non-finite grads before the update so no NaN reaches the optimizer's arithmetic.
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, new_opt = optimizer.update(safe_grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    n_applied = state.step - state.skipped  # updates applied before this one
    new_ema = ema_update(state.ema, new_params, ema_decay(n_applied + 1, decay))

    def keep(new, old):
      return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    new_state = TrainState(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt, state.opt_state),
      ema=keep(new_ema, state.ema),
      rng=state.rng,
      bad_steps=jnp.where(finite, 0, state.bad_steps + 1).astype(jnp.int32),
      skipped=(state.skipped + jnp.where(finite, 0, 1)).astype(jnp.int32),
    )
    n_tokens = lengths.astype(jnp.float32).sum()
    metrics = {
      "loss": loss,
      "loss_per_token": loss_sum / jnp.maximum(n_tokens, 1.0),
      "grad_norm": grad_norm,
      "lr": jnp.asarray(schedule(n_applied), jnp.float32),
      "finite": finite,
      "bad_steps": new_state.bad_steps,
      "skipped": new_state.skipped,
      "tokens": n_tokens,
    }
    return new_state, metrics

  rep = NamedSharding(mesh, P())
  bs = batch_sharding(mesh)
  return jax.jit(
    step_fn,
    in_shardings=(state_sharding, replicated(mesh, rest), {k: bs for k in BATCH_KEYS}),
    out_shardings=(state_sharding, rep),
    donate_argnums=(0,),
    compiler_options=compiler_options,
  )


def make_eval_step(cfg: ml_collections.ConfigDict, graph, noise, defs: ModelDefs,
                   mesh: jax.sharding.Mesh, params_sharding: Any, rest: Any,
                   compiler_options: dict | None = None) -> Callable:
  """Builds the jitted `eval_step(params, rest, batch, key) -> (loss_sum, n_seqs, n_tokens)`.

  Dropout off, no curriculum: t ~ U[time_eps, 1) from `key`, so with a fixed key per batch the
  validation loss is comparable across steps. Use it with the EMA parameters.
  """
  time_eps = float(cfg.training.time_eps)
  plain = diffusion.Curriculum(kind="none")

  def eval_fn(params, rest, batch, key):
    model = nnx.merge(defs.eval, params, rest)
    tokens, lengths = batch["tokens"], batch["lengths"]
    b = tokens.shape[0]
    t, row_keys, _, cs, ls = draw_noise(key, b, jnp.zeros((), jnp.int32), plain, time_eps)
    per_seq = sequence_losses(model, graph, noise, tokens, lengths, t, row_keys, cs, ls)
    return per_seq.sum(), jnp.float32(b), lengths.astype(jnp.float32).sum()

  rep = NamedSharding(mesh, P())
  bs = batch_sharding(mesh)
  return jax.jit(eval_fn, in_shardings=(params_sharding, replicated(mesh, rest),
                                        {k: bs for k in BATCH_KEYS}, rep),
                 out_shardings=rep, compiler_options=compiler_options)


def flops_per_token(cfg: ml_collections.ConfigDict, n_params: int, vocab: int) -> float:
  """Training FLOPs per token: 6 * (non-embedding params) + 12 * blocks * L * hidden."""
  h, L = cfg.model.hidden_size, cfg.model.length
  non_embedding = max(0, n_params - vocab * h)
  return 6.0 * non_embedding + 12.0 * cfg.model.n_blocks * L * h
