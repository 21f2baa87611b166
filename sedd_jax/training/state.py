"""Train state (parameters, optimizer state, EMA, counters) and the optimizer built from config.

The state is a plain pytree (`TrainState`, a `flax.struct` dataclass) holding the model's
`nnx.Param` state, so the train step is a pure function of it (Flax `examples/gemma` style):
`nnx.split` the model once into a `graphdef` (static) and its parameter state, and `nnx.merge`
inside the jitted step. Whatever else the model holds (its dropout `RngStream`s) is kept apart
as `rest`: it is not trained and not checkpointed, because the dropout stream is reseeded every
step from `fold_in(state.rng, step)`.

Optimizer (the reference recipe): `clip_by_global_norm(cfg.optim.clip)` (skipped when clip is 0)
then AdamW(lr schedule, b1, b2, eps, weight_decay) on every parameter. The learning rate rises
linearly over the first `optim.warmup` updates as the reference's, which counts updates from 1:
update k = 1, 2, ... uses lr * min(k / warmup, 1), so the first update uses lr / warmup and update
`warmup` the full lr. It then stays constant or follows a cosine decay to 0 at `training.steps`.

EMA of the parameters with effective decay `min(decay, (1 + n) / (10 + n))`, n counting the
applied updates including the current one (the reference's ExponentialMovingAverage). Skipped
(non-finite) steps apply no update, so the schedule and the EMA count `step - skipped`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """Everything the train step updates.

  Attributes:
    step: () int32, number of train steps taken (batches consumed, skipped ones included).
    params: nnx.State of the model's `nnx.Param`s (float32).
    opt_state: the optax state (clip + AdamW; moments shaped like `params`).
    ema: nnx.State, EMA of `params`.
    rng: (2,) uint32 raw PRNG key of the run; step keys are `fold_in(rng, step)`.
    bad_steps: () int32, consecutive non-finite steps up to now (0 after a good step).
    skipped: () int32, total non-finite (skipped) steps.
  """

  step: Array
  params: Any
  opt_state: Any
  ema: Any
  rng: Array
  bad_steps: Array
  skipped: Array


@dataclasses.dataclass(frozen=True)
class ModelDefs:
  """The static halves of a split model: graphdefs in train and eval mode (dropout on / off)."""

  train: Any
  eval: Any


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """lr(n) for the optimizer's update count n = 0, 1, ... (updates applied before this one):
  lr * min((n + 1) / warmup, 1) during warmup (the reference's lr * min(k / warmup, 1) for update
  k = n + 1), then constant or a cosine decay from lr at n = warmup to 0 at `training.steps`."""
  lr = float(cfg.optim.lr)
  warmup = int(cfg.optim.warmup)
  total = int(cfg.training.steps)
  if cfg.optim.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps=max(1, total - warmup), alpha=0.0)
  else:
    after = optax.constant_schedule(lr)
  if warmup <= 0:
    return after
  def warm(n):
    return lr * jnp.minimum((n + 1.0) / warmup, 1.0)

  return optax.join_schedules([warm, after], boundaries=[warmup])


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm(optim.clip) (if > 0) followed by AdamW with `make_schedule(cfg)`."""
  parts = []
  if cfg.optim.clip > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.optim.clip)))
  parts.append(optax.adamw(make_schedule(cfg), b1=float(cfg.optim.beta1),
                           b2=float(cfg.optim.beta2), eps=float(cfg.optim.eps),
                           weight_decay=float(cfg.optim.weight_decay)))
  return optax.chain(*parts)


def ema_decay(n: Array, decay: float) -> Array:
  """Effective EMA decay for the n-th update (n >= 1): min(decay, (1 + n) / (10 + n))."""
  n = jnp.asarray(n, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, decay: Array) -> Any:
  """ema <- decay * ema + (1 - decay) * params, leafwise (float32)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def build_model(cfg: ml_collections.ConfigDict, graph, seed: int | None = None):
  """A DDiT for `cfg.model` and the graph's vocabulary (D = graph.dim), initialised from seed."""
  from sedd_jax.model.ddit import DDiT  # imported late: training modules load without it
  seed = int(cfg.seed if seed is None else seed)
  return DDiT(cfg.model, vocab_size=graph.dim, absorb=graph.absorb,
              rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def split_model(model: nnx.Module) -> tuple[ModelDefs, nnx.State, nnx.State]:
  """Splits `model` into (ModelDefs, params, rest); leaves `model` in eval mode."""
  model.train()
  graphdef_train, params, rest = nnx.split(model, nnx.Param, ...)
  model.eval()
  graphdef_eval, _, _ = nnx.split(model, nnx.Param, ...)
  return ModelDefs(train=graphdef_train, eval=graphdef_eval), params, rest


def init_state(cfg: ml_collections.ConfigDict, params: nnx.State,
               optimizer: optax.GradientTransformation | None = None) -> TrainState:
  """A fresh state at step 0: EMA = params, optimizer initialised, rng from cfg.seed."""
  optimizer = optimizer or make_optimizer(cfg)
  params = jax.tree.map(jnp.asarray, params)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    ema=jax.tree.map(jnp.copy, params),
    rng=jnp.asarray(jax.random.PRNGKey(int(cfg.seed) + 2), jnp.uint32),
    bad_steps=jnp.zeros((), jnp.int32),
    skipped=jnp.zeros((), jnp.int32),
  )


def abstract_state(cfg: ml_collections.ConfigDict, build_model: Callable[[], nnx.Module],
                   optimizer: optax.GradientTransformation) -> TrainState:
  """The step-0 TrainState of `init_state(cfg, params of build_model(), optimizer)` as
  jax.ShapeDtypeStruct leaves: its shapes, with nothing initialised or compiled."""

  def build() -> TrainState:
    _, params, _ = split_model(build_model())
    return init_state(cfg, params, optimizer)

  return jax.eval_shape(build)


def param_count(params: Any) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
