"""The jit-compiled train and eval steps and the job's set-up, for any task.

The loss comes from a task object (the `Task` protocol of `sedd_jax.training.task`):
`sedd_jax.training.sedd_task.SeddTask` for protein-only SEDD,
`sedd_jax.protein_ligand.task.ProteinLigandTask` for the dual-track model. `setup(cfg,
devices)` builds what a training job (or a benchmark) needs: task, model split, optimizer,
mesh, sharded initial state.

Devices (mesh, shardings and placement in `sedd_jax.training.sharding`): one 1-D mesh
`('data',)` over all devices (`jax.make_mesh`); batches are sharded over
`data` on their first axis; parameters, EMA and optimizer moments are replicated, or with
`cfg.training.fsdp` sharded fsdp-style (each array's largest axis divisible by the device count
is split over `data`; arrays with none stay replicated) and gathered for the compute: the loss
and the eval step see replicated parameters (a sharding constraint), so activations stay
sharded on the batch only. Without it XLA may shard q/k/v on the head axis after the sharded
qkv matmul, which cuDNN attention with a (B, 1, L, L) bias rejects ("Query and bias should have
same sharding on batch and num_head dim", seen with FSDP on 2 H200s). XLA inserts the
collectives; no pmap.
Several processes (`jax.distributed`): the mesh spans the devices of all of them; every process
builds the same step-0 state from the seed and the same host batch (the GLOBAL batch), and
`put_global` / `put_batch` hand each local device its part (`jax.make_array_from_callback`), so
neither the state nor the batch stream depends on the number of processes.

Train step (pure; `state` donated), shown for the SEDD task (`draw` + `loss`):

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
depend on `accum` or on the number of devices (up to float summation order). Other tasks draw
their step randomness in `task.draw` the same way; micro-batch a's loss key is
`fold_in(draw.loss_key, a)`.

Loss normalisation: as the reference, a per-sequence SUM over real positions, then the MEAN over
sequences (not divided by the number of tokens). Packed rows (data.pad_to="pack", batches with
segment_ids/positions; docs/packing.md): one t and corruption key per ROW, a sum per sequence
of the row, and the mean over all sequences of the global batch, whatever `accum`.
`loss_per_token` (sum / real tokens) is reported as a metric too.

Non-finite loss or gradient norm: params, optimizer state and EMA stay as they were; `step`
advances (the batch is consumed), `bad_steps` (consecutive) and `skipped` (total) count it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sedd_jax.training import sharding
from sedd_jax.training import state as state_lib
from sedd_jax.training import task as task_lib
from sedd_jax.training.state import ModelDefs
from sedd_jax.training.state import TrainState
from sedd_jax.training.state import ema_decay
from sedd_jax.training.state import ema_update
from sedd_jax.training.state import make_schedule

Array = jax.Array


def _micro_batches(x: Array, accum: int) -> Array:
  """(B, ...) -> (accum, B / accum, ...): micro-batch a holds rows j * accum + a."""
  b = x.shape[0]
  y = x.reshape((b // accum, accum) + x.shape[1:])
  y = jnp.swapaxes(y, 0, 1)
  return y


# ----------------------------------------------------------------------------------------------
# Train step.


def _gather_fn(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Callable:
  """params -> params for the compute: with cfg.training.fsdp on several devices constrained to
  replicated (sharded storage, replicated compute; module docstring), else unchanged."""
  if not (bool(cfg.training.fsdp) and mesh.size > 1):
    return lambda params: params
  replicated = NamedSharding(mesh, P())
  return lambda params: jax.lax.with_sharding_constraint(params, replicated)


def _loss_and_grads_fn(cfg: ml_collections.ConfigDict, task: task_lib.Task, defs: ModelDefs,
                       mesh: jax.sharding.Mesh) -> Callable:
  """The pure `loss_and_grads(params, rest, batch, step, rng) -> (loss, aux, grads)`.

  loss: () mean over the micro-batches of the task's loss; aux: the task's aux (`loss_sum`
  summed over micro-batches, the other metrics averaged); grads: the gradient of `loss`
  (shaped like params), accumulated over `cfg.training.accum` micro-batches.
  """
  accum = int(cfg.training.accum)
  use_dropout = float(cfg.model.dropout) > 0

  def reseeded(params, rest, drop_key):
    """`rest` with the dropout streams reset to `drop_key` (done outside the grad trace)."""
    if not use_dropout:
      return rest
    # Fresh Variables: inside the accumulation scan, `rest` belongs to the outer trace.
    model = nnx.merge(defs.train, params, jax.tree.map(lambda x: x, rest))
    nnx.reseed(model, dropout=drop_key)
    return nnx.split(model, nnx.Param, ...)[2]

  gather = _gather_fn(cfg, mesh)

  def loss_fn(params, rest, rows, shared, key, step):
    params = gather(params)
    # Fresh Variables at this trace level (dropout advances its RngCount while running).
    rest = jax.tree.map(lambda x: x, rest)
    model = nnx.merge(defs.train, params, rest)
    return task.loss(model, rows, shared, key, step)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro_key(base, a):
    return None if base is None else jax.random.fold_in(base, a)

  def loss_and_grads(params, rest, batch, step, rng):
    b = batch["tokens"].shape[0]
    if b % accum:
      raise ValueError(f"batch {b} is not divisible by training.accum = {accum}")
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    draw = task.draw(key, batch, step)
    if accum == 1:
      r = reseeded(params, rest, jax.random.fold_in(draw.dropout_key, 0))
      (loss, aux), grads = grad_fn(params, r, draw.rows, draw.shared,
                                   micro_key(draw.loss_key, 0), step)
      return loss, aux, grads
    mbs = {k: _micro_batches(a, accum) for k, a in draw.rows.items()}
    mbs = {k: jax.lax.with_sharding_constraint(
      a, NamedSharding(mesh, P(*((None, sharding.AXIS) + (None,) * (a.ndim - 2)))))
           for k, a in mbs.items()}
    aux_shape = jax.eval_shape(  # the aux pytree (eval mode: no dropout state to advance)
      lambda: task.loss(nnx.merge(defs.eval, params, rest), jax.tree.map(lambda x: x[0], mbs),
                        draw.shared, micro_key(draw.loss_key, 0), step)[1])

    def body(carry, xs):
      g_acc, l_acc, aux_acc = carry
      a, rows = xs
      r = reseeded(params, rest, jax.random.fold_in(draw.dropout_key, a))
      (l, aux), g = grad_fn(params, r, rows, draw.shared, micro_key(draw.loss_key, a), step)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, jax.tree.map(jnp.add, aux_acc, aux)), None

    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
            jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), aux_shape))
    (grads, loss, aux), _ = jax.lax.scan(body, init, (jnp.arange(accum), mbs))
    aux = {k: v if k == "loss_sum" else v / accum for k, v in aux.items()}
    return loss / accum, aux, jax.tree.map(lambda g: g / accum, grads)

  return loss_and_grads


def make_grad_fn(cfg: ml_collections.ConfigDict, task: task_lib.Task, defs: ModelDefs,
                 mesh: jax.sharding.Mesh) -> Callable:
  """The pure `loss_and_grads(params, rest, batch, step, rng) -> (loss, loss_sum, grads)`.

  loss: () mean over the global batch of the per-sequence loss; loss_sum: () its sum; grads: the
  gradient of `loss` (shaped like params), accumulated over `cfg.training.accum` micro-batches.
  `step` () int32 and `rng` (2,) uint32 pick the randomness (see the module docstring).
  """
  fn = _loss_and_grads_fn(cfg, task, defs, mesh)

  def loss_and_grads(params, rest, batch, step, rng):
    loss, aux, grads = fn(params, rest, batch, step, rng)
    return loss, aux["loss_sum"], grads

  return loss_and_grads


def make_train_step(cfg: ml_collections.ConfigDict, task: task_lib.Task, defs: ModelDefs,
                    optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    state_sharding: TrainState, rest: Any,
                    compiler_options: dict | None = None) -> Callable:
  """Builds the jitted `train_step(state, rest, batch) -> (state, metrics)`.

  `state` is donated. `batch` is {k: (B, ...)} for k in `task.batch_keys` (SEDD: 'tokens'
  (B, L) int32, 'lengths' (B,) int32) sharded over 'data' (B = cfg.training.batch_size).
  metrics: scalars loss, loss_per_token, grad_norm, lr, finite (bool), bad_steps, skipped,
  tokens (real tokens in the batch), and the task's extra metrics. `compiler_options` go to XLA
  (tests pass {"xla_backend_optimization_level": 0} to compile faster on the CPU).
  """
  decay = float(cfg.training.ema)
  schedule = make_schedule(cfg)
  loss_and_grads = _loss_and_grads_fn(cfg, task, defs, mesh)

  def step_fn(state: TrainState, rest, batch):
    loss, aux, grads = loss_and_grads(state.params, rest, batch, state.step, state.rng)
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
    n_tokens = task.count_tokens(batch)[1]
    metrics = {
      "loss": loss,
      "loss_per_token": aux["loss_sum"] / jnp.maximum(n_tokens, 1.0),
      "grad_norm": grad_norm,
      "lr": jnp.asarray(schedule(n_applied), jnp.float32),
      "finite": finite,
      "bad_steps": new_state.bad_steps,
      "skipped": new_state.skipped,
      "tokens": n_tokens,
      **{k: v for k, v in aux.items() if k != "loss_sum"},
    }
    return new_state, metrics

  rep = NamedSharding(mesh, P())
  bs = sharding.batch_sharding(mesh)
  return jax.jit(
    step_fn,
    in_shardings=(state_sharding, sharding.replicated(mesh, rest),
                  {k: bs for k in task.batch_keys}),
    out_shardings=(state_sharding, rep),
    donate_argnums=(0,),
    compiler_options=compiler_options,
  )


def make_eval_step(cfg: ml_collections.ConfigDict, task: task_lib.Task, defs: ModelDefs,
                   mesh: jax.sharding.Mesh, params_sharding: Any, rest: Any,
                   compiler_options: dict | None = None) -> Callable:
  """Builds the jitted `eval_step(params, rest, batch, key) -> sums` (`task.eval_loss`).

  sums: {"loss": () sum over the batch's sequences, ..., "n_seqs": (), "n_tokens": ()}. Dropout
  off, no curriculum: t ~ U[time_eps, 1) from `key`, so with a fixed key per batch the
  validation loss is comparable across steps. Use it with the EMA parameters.
  """

  gather = _gather_fn(cfg, mesh)

  def eval_fn(params, rest, batch, key):
    return task.eval_loss(nnx.merge(defs.eval, gather(params), rest), batch, key)

  rep = NamedSharding(mesh, P())
  bs = sharding.batch_sharding(mesh)
  return jax.jit(eval_fn, in_shardings=(params_sharding, sharding.replicated(mesh, rest),
                                        {k: bs for k in task.batch_keys}, rep),
                 out_shardings=rep, compiler_options=compiler_options)


# ----------------------------------------------------------------------------------------------
# Set-up shared by the training job and the benchmarks.


@dataclasses.dataclass
class Setup:
  """Everything a training job builds before its first step (`setup`).

  Attributes:
    cfg: the config; task: its task (`task.graph`/`task.noise` for SEDD).
    defs: the model's graphdefs (train / eval); rest: its non-parameter state (dropout
      streams), replicated over the mesh.
    n_params: number of parameters.
    optimizer: `task.wrap_optimizer(state.make_optimizer(cfg))`.
    mesh: the ('data',) mesh; state: the step-0 TrainState placed with `shardings`.
  """

  cfg: ml_collections.ConfigDict
  task: task_lib.Task
  defs: ModelDefs
  rest: Any
  n_params: int
  optimizer: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  state: TrainState
  shardings: TrainState

  def train_step(self, compiler_options: dict | None = None) -> Callable:
    """`make_train_step` for this set-up."""
    return make_train_step(self.cfg, self.task, self.defs, self.optimizer, self.mesh,
                           self.shardings, self.rest, compiler_options=compiler_options)

  def eval_step(self, compiler_options: dict | None = None) -> Callable:
    """`make_eval_step` for this set-up (EMA parameters' shardings)."""
    return make_eval_step(self.cfg, self.task, self.defs, self.mesh, self.shardings.ema,
                          self.rest, compiler_options=compiler_options)

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Array]:
    """The global host batch (the same on every process) -> the task's batch arrays sharded
    over 'data'."""
    return sharding.put_batch(batch, sharding.batch_sharding(self.mesh), self.task.batch_keys)


def setup(cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None,
          task: task_lib.Task | None = None) -> Setup:
  """Task, model, optimizer, mesh over `devices` (default all) and the sharded step-0 state
  (fsdp-style where cfg.training.fsdp). `task` defaults to `task.get_task(cfg)`."""
  task = task if task is not None else task_lib.get_task(cfg)
  defs, params, rest = state_lib.split_model(task.build_model())
  n_params = state_lib.param_count(params)
  optimizer = task.wrap_optimizer(state_lib.make_optimizer(cfg))
  mesh = sharding.make_mesh(devices)
  state = state_lib.init_state(cfg, params, optimizer)
  shardings = sharding.state_shardings(mesh, state, bool(cfg.training.fsdp))
  state = sharding.put_global(state, shardings)
  rest = sharding.put_global(rest, sharding.replicated(mesh, rest))
  return Setup(cfg=cfg, task=task, defs=defs, rest=rest, n_params=n_params, optimizer=optimizer,
               mesh=mesh, state=state, shardings=shardings)


def flops_per_token(cfg: ml_collections.ConfigDict, n_params: int, vocab: int) -> float:
  """Training FLOPs per token: 6 * (non-embedding params) + 12 * blocks * L * hidden."""
  h, L = cfg.model.hidden_size, cfg.model.length
  non_embedding = max(0, n_params - vocab * h)
  return 6.0 * non_embedding + 12.0 * cfg.model.n_blocks * L * h
