"""Tests of sedd_jax.training.sharding: the mesh, fsdp specs and shardings, global placement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sedd_jax.training import sharding as sharding_lib
from sedd_jax.training.state import TrainState


def test_fsdp_spec():
  assert sharding_lib.fsdp_spec((64, 24), 8) == jax.sharding.PartitionSpec("data", None)
  assert sharding_lib.fsdp_spec((24, 64), 8) == jax.sharding.PartitionSpec(None, "data")
  assert sharding_lib.fsdp_spec((3, 5), 8) == jax.sharding.PartitionSpec()
  assert sharding_lib.fsdp_spec((), 8) == jax.sharding.PartitionSpec()
  assert sharding_lib.fsdp_spec((64,), 1) == jax.sharding.PartitionSpec()


def test_put_batch_gives_each_device_its_rows_of_the_global_batch():
  """4 devices, 8 rows: device i holds rows 2i, 2i + 1 (what a process takes from the global
  batch); rows not divisible by the devices are refused, naming the key."""
  mesh = sharding_lib.make_mesh(jax.devices()[:4])
  tokens = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
  out = sharding_lib.put_batch({"tokens": tokens, "lengths": np.arange(8, dtype=np.int32)},
                               sharding_lib.batch_sharding(mesh))
  shards = {s.device: np.asarray(s.data) for s in out["tokens"].addressable_shards}
  for i, d in enumerate(mesh.devices.flat):
    np.testing.assert_array_equal(shards[d], tokens[2 * i:2 * i + 2])
  with pytest.raises(ValueError, match="'tokens'.* 6 rows"):
    sharding_lib.put_batch({"tokens": tokens[:6], "lengths": np.arange(6, dtype=np.int32)},
                           sharding_lib.batch_sharding(mesh))


def _state():
  """A TrainState of host arrays: kernel (64, 24) splits on axis 0, (24, 64) on 1, bias (3,)
  on none."""
  params = {"a": {"kernel": np.ones((64, 24), np.float32)}, "b": np.zeros((24, 64), np.float32),
            "bias": np.arange(3, dtype=np.float32)}
  return TrainState(step=np.int32(5), params=params, opt_state=(params, {"count": np.int32(2)}),
                    ema=params, rng=np.array([1, 2], np.uint32), bad_steps=np.int32(0),
                    skipped=np.int32(1))


def test_state_shardings_on_8_devices_split_each_array_on_its_largest_divisible_axis():
  mesh = sharding_lib.make_mesh()
  assert dict(mesh.shape) == {"data": 8} and mesh.axis_names == ("data",)
  sh = sharding_lib.state_shardings(mesh, _state(), fsdp=True)
  specs = {"a.kernel": P("data", None), "b": P(None, "data"), "bias": P()}
  for tree in (sh.params, sh.ema, sh.opt_state[0]):
    got = {k: v.spec for k, v in zip(("a.kernel", "b", "bias"), jax.tree.leaves(tree))}
    assert got == specs
  assert sh.opt_state[1]["count"].spec == P()
  for s in (sh.step, sh.rng, sh.bad_steps, sh.skipped):
    assert s.spec == P() and s.mesh is mesh
  replicated = sharding_lib.state_shardings(mesh, _state(), fsdp=False)
  assert {s.spec for s in jax.tree.leaves(replicated)} == {P()}


def test_put_global_places_every_leaf_with_its_sharding_and_keeps_the_values():
  """A round trip: each device holds its slice of the host value (fsdp) or all of it
  (replicated); PRNG key arrays keep their key data."""
  mesh = sharding_lib.make_mesh()
  state = _state()
  sh = sharding_lib.state_shardings(mesh, state, fsdp=True)
  placed = sharding_lib.put_global(state, sh)
  for x, y, s in zip(jax.tree.leaves(placed), jax.tree.leaves(state), jax.tree.leaves(sh)):
    assert x.sharding == s
    np.testing.assert_array_equal(np.asarray(jax.device_get(x)), y)
  kernel = placed.params["a"]["kernel"]
  assert {tuple(sh.data.shape) for sh in kernel.addressable_shards} == {(8, 24)}
  key = jax.random.key(3)
  rep = jax.sharding.NamedSharding(mesh, P())
  moved = sharding_lib.put_global({"k": key}, {"k": rep})["k"]
  assert jnp.issubdtype(moved.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(moved), jax.random.key_data(key))
  sharding_lib.barrier("one process: returns at once")
