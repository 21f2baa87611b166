"""The jitted train step: 8 devices == 1 device, accumulation == one big batch, NaN skipping;
fsdp's parameter gather in the train and eval steps."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import FAST, STEP_B as B, STEP_L as L  # the batch's rows and width
from helpers import step_batch as host_batch
from helpers import step_config as micro_config
from sedd_jax import diffusion
from sedd_jax.training import state as state_lib
from sedd_jax.training import sedd_task as sedd_task_lib
from sedd_jax.training import sharding as sharding_lib
from sedd_jax.training import step as step_lib


class Setup:
  """Model, initial state, and per-(devices, accum, fsdp) compiled functions."""

  def __init__(self):
    self.cfg = micro_config()
    self.graph = diffusion.get_graph(self.cfg.graph)
    self.noise = diffusion.get_noise(self.cfg.noise)
    self.task = sedd_task_lib.SeddTask(self.cfg, graph=self.graph, noise=self.noise)
    model = state_lib.build_model(self.cfg, self.graph)
    self.defs, self.params, self.rest = state_lib.split_model(model)
    self.opt = state_lib.make_optimizer(self.cfg)
    self.state0 = state_lib.init_state(self.cfg, self.params, self.opt)
    self._steps = {}
    self._grads = {}

  def mesh(self, n):
    return sharding_lib.make_mesh(jax.devices()[:n])

  def grads(self, n, accum=1, fsdp=False, batch=None):
    key = (n, accum, fsdp)
    if key not in self._grads:
      cfg = micro_config(**{"training.accum": accum})
      mesh = self.mesh(n)
      task = sedd_task_lib.SeddTask(cfg, graph=self.graph, noise=self.noise)
      fn = step_lib.make_grad_fn(cfg, task, self.defs, mesh)
      psh = sharding_lib.param_shardings(mesh, self.params, fsdp)
      bsh = sharding_lib.batch_sharding(mesh)
      self._grads[key] = (jax.jit(fn, in_shardings=(
        psh, sharding_lib.replicated(mesh, self.rest), {k: bsh for k in task.batch_keys}, None,
        None), compiler_options=FAST), bsh)
    jf, bsh = self._grads[key]
    b = sharding_lib.put_batch(batch or host_batch(), bsh)
    return jax.device_get(jf(self.params, self.rest, b, jnp.int32(3), self.state0.rng))

  def train_step(self, n, fsdp=False):
    key = (n, fsdp)
    if key not in self._steps:
      mesh = self.mesh(n)
      sh = sharding_lib.state_shardings(mesh, self.state0, fsdp)
      # training.fsdp: the step also gathers the sharded parameters for the compute
      cfg = micro_config(**{"training.fsdp": fsdp})
      task = sedd_task_lib.SeddTask(cfg, graph=self.graph, noise=self.noise)
      fn = step_lib.make_train_step(cfg, task, self.defs, self.opt, mesh, sh, self.rest,
                                    compiler_options=FAST)
      self._steps[key] = (fn, sh, sharding_lib.batch_sharding(mesh))
    return self._steps[key]

  def run(self, n, state, batch, fsdp=False):
    fn, sh, bsh = self.train_step(n, fsdp)
    state = jax.device_put(jax.tree.map(jnp.array, state), sh)
    return fn(state, self.rest, sharding_lib.put_batch(batch, bsh))


@pytest.fixture(scope="module")
def setup():
  return Setup()


def _close(a, b, rtol=2e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_8_devices_equal_1_device(setup):
  """Same loss, metrics and updated state on a mesh of 8 (fsdp) and of 1 device."""
  assert jax.device_count() >= 8, "conftest sets 8 simulated CPU devices"
  batch = host_batch()
  s1, m1 = setup.run(1, setup.state0, batch)
  s8, m8 = setup.run(8, setup.state0, batch, fsdp=True)
  m1, m8 = jax.device_get((m1, m8))
  for k in ("loss", "loss_per_token", "grad_norm", "lr"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, err_msg=k)
  assert bool(m1["finite"]) and int(m1["skipped"]) == 0
  assert int(s8.step) == int(s1.step) == 1
  # The parameters really were sharded fsdp-style.
  kernel = s8.params["blocks"][0]["mlp_in"]["kernel"][...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "data")
  _close(jax.device_get(s8.params), jax.device_get(s1.params), atol=2e-6)
  _close(jax.device_get(s8.ema), jax.device_get(s1.ema), atol=2e-6)
  # The update is a real one: params moved by about lr (Adam's first step).
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
              zip(jax.tree.leaves(jax.device_get(s1.params)), jax.tree.leaves(setup.params)))
  assert 0.5e-3 < moved < 2e-3


def test_grads_8_devices_equal_1_device(setup):
  l1, s1, g1 = setup.grads(1)
  l8, s8, g8 = setup.grads(8)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  _close(g8, g1, rtol=1e-4, atol=1e-6)


def test_accumulation_equals_one_big_batch(setup):
  """2 micro-batches of 4 (on 4 devices) == 1 batch of 8 (1 device): loss and gradients."""
  l1, s1, g1 = setup.grads(1, accum=1)
  l2, s2, g2 = setup.grads(4, accum=2)
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  np.testing.assert_allclose(s2, s1, rtol=1e-5)
  _close(g2, g1, rtol=1e-4, atol=1e-6)
  l4, _, g4 = setup.grads(1, accum=4)
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  _close(g4, g1, rtol=1e-4, atol=1e-6)


def test_loss_is_sequence_sum_batch_mean(setup):
  """loss = mean over sequences of the per-sequence SUM (padding excluded)."""
  batch = host_batch()
  loss, loss_sum, _ = setup.grads(1, batch=batch)
  np.testing.assert_allclose(loss * B, loss_sum, rtol=1e-5)
  # Padding does not count: changing pad positions' tokens leaves the loss unchanged.
  other = {k: v.copy() for k, v in batch.items()}
  for i in range(B):
    other["tokens"][i, other["lengths"][i]:] = 7
  loss2, _, _ = setup.grads(1, batch=other)
  np.testing.assert_allclose(loss2, loss, rtol=1e-5)


def test_non_finite_step_is_skipped(setup):
  """A NaN loss leaves params/opt state/EMA unchanged, counts the skip, then recovers."""
  batch = host_batch()
  nan_params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), setup.params)
  bad = setup.state0.replace(params=nan_params)
  s, m = setup.run(1, bad, batch)
  m = jax.device_get(m)
  assert not bool(m["finite"]) and int(m["bad_steps"]) == 1 and int(m["skipped"]) == 1
  assert int(s.step) == 1
  _close(jax.device_get(s.params), nan_params, rtol=0, atol=0)
  _close(jax.device_get(s.opt_state), jax.device_get(bad.opt_state), rtol=0, atol=0)
  _close(jax.device_get(s.ema), jax.device_get(bad.ema), rtol=0, atol=0)
  # Again: the consecutive count grows.
  s, m = setup.run(1, s, batch)
  assert int(m["bad_steps"]) == 2 and int(m["skipped"]) == 2
  # With good params the next step is applied and the consecutive count resets.
  good = jax.device_get(s).replace(params=setup.params)
  s, m = setup.run(1, good, batch)
  assert bool(m["finite"]) and int(m["bad_steps"]) == 0 and int(m["skipped"]) == 2
  # The learning rate counts applied updates only (step 2 - 2 skipped = update 0).
  assert float(m["lr"]) == pytest.approx(1e-3)


def packed_host_batch(seed=0):
  """B rows of width L: even rows one sequence, odd rows three (unequal micro-batches)."""
  rng = np.random.default_rng(seed)
  b = host_batch(seed)
  seg = np.zeros((B, L), np.int32)
  pos = np.zeros((B, L), np.int32)
  for i in range(B):
    cuts = [0, L - 2] if i % 2 == 0 else [0, 7, 15, L - 3]
    for s, (a, e) in enumerate(zip(cuts[:-1], cuts[1:]), 1):
      seg[i, a:e], pos[i, a:e] = s, np.arange(e - a)
  tokens = np.where(seg > 0, rng.integers(4, 24, size=(B, L)), 1).astype(np.int32)
  return {**b, "tokens": tokens, "lengths": (seg > 0).sum(1).astype(np.int32),
          "segment_ids": seg, "positions": pos}


def test_packed_loss_is_the_mean_over_all_sequences_for_any_accum():
  cfgs = {a: micro_config(**{"data.pad_to": "pack", "training.accum": a}) for a in (1, 2)}
  graph = diffusion.get_graph(cfgs[1].graph)
  defs, params, rest = state_lib.split_model(state_lib.build_model(cfgs[1], graph))
  mesh = sharding_lib.make_mesh(jax.devices()[:1])
  batch = packed_host_batch()
  out = {}
  for a, cfg in cfgs.items():
    task = sedd_task_lib.SeddTask.from_config(cfg)
    fn = step_lib.make_grad_fn(cfg, task, defs, mesh)
    data = {k: jnp.asarray(v) for k, v in batch.items() if k in task.batch_keys}
    out[a] = jax.jit(fn, compiler_options=FAST)(params, rest, data, jnp.int32(3),
                                                jax.random.key_data(jax.random.key(0)))
  (l1, s1, g1), (l2, s2, g2) = out[1], out[2]
  n = 4 * 1 + 4 * 3  # sequences in the batch
  np.testing.assert_allclose(l1, s1 / n, rtol=1e-5)
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  np.testing.assert_allclose(s2, s1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fsdp_eval_step_computes_with_gathered_parameters_as_the_train_step():
  """training.fsdp: the eval step, like the train step, constrains every sharded parameter to
  replicated for the compute (XLA could otherwise shard q/k/v on the head axis, which cuDNN's
  partitioner rejects for a bias); without fsdp there is no constraint."""
  key = jax.random.PRNGKey(0)
  for fsdp in (False, True):
    s = step_lib.setup(micro_config(**{"training.fsdp": fsdp}))
    batch = s.put_batch(host_batch())
    ev = s.eval_step(FAST).lower(s.state.ema, s.rest, batch, key).as_text()
    tr = s.train_step(FAST).lower(s.state, s.rest, batch).as_text()
    ev_count, tr_count = (len(re.findall(r"sdy\.sharding_constraint|@Sharding", t))
                          for t in (ev, tr))
    n = len(jax.tree.leaves(s.state.ema)) if fsdp else 0  # (the train step: + the gradients')
    assert ev_count == n and (tr_count >= n if fsdp else tr_count == 0), (ev_count, tr_count)
