"""Device mesh, shardings and the placement of global values (one or several processes).

One 1-D mesh `('data',)` over all devices (`jax.make_mesh`); batches are sharded over `data`
on their first axis; parameters, EMA and optimizer moments are replicated, or (fsdp) sharded on
their largest axis divisible by the device count. Several processes (`jax.distributed`): every
process holds the same global value (state from the seed, the GLOBAL batch) and `put_global` /
`put_batch` hand each local device its part (`jax.make_array_from_callback`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sedd_jax.training.state import TrainState

Array = jax.Array
AXIS = "data"


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


def barrier(name: str) -> None:
  """Waits until every process reaches `barrier(name)` (returns at once with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def put_global(tree: Any, shardings: Any) -> Any:
  """Places `tree`, whose value is the same on every process, with `shardings` (a matching tree).

  Fully addressable shardings (one process) use `jax.device_put`; a mesh spanning several
  processes gets global arrays whose local shards are sliced from this process's copy
  (`jax.make_array_from_callback`; PRNG key arrays via their key data).
  """

  def one(x, s):
    if s.is_fully_addressable:
      return jax.device_put(x, s)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

  return jax.tree.map(one, tree, shardings)


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding,
              keys: Sequence[str] | None = None) -> dict[str, Array]:
  """The global batch `batch[k]` (B, ...) for k in `keys` (default all of `batch`'s; the
  training job passes `task.batch_keys`), the same on every process -> arrays sharded over
  'data' on their first axis (`put_global`); each device receives only its rows (any number of
  processes). ValueError naming the key when B is not a multiple of the mesh's devices."""
  host = {k: np.asarray(batch[k]) for k in (batch if keys is None else keys)}
  n = sharding.mesh.shape[AXIS]
  for k, x in host.items():
    if x.shape[0] % n:
      raise ValueError(f"batch[{k!r}] has {x.shape[0]} rows, not a multiple of the {n} devices "
                       "of the mesh")
  return put_global(host, {k: sharding for k in host})
