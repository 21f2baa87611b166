"""Optimizer, learning-rate schedule, EMA and the initial train state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config
from sedd_jax import config as config_lib
from sedd_jax.training import state as state_lib


def _cfg(**over):
  cfg = load_config()
  config_lib.apply_overrides(cfg, over)
  return cfg


def test_schedule_warmup_then_constant():
  """The reference's lr * min(k / warmup, 1) for update k = n + 1 = 1, 2, ...: the first update
  uses lr / warmup, update `warmup` (n = warmup - 1) the full lr."""
  sched = state_lib.make_schedule(_cfg(**{"optim.lr": 1e-3, "optim.warmup": 10}))
  np.testing.assert_allclose([float(sched(n)) for n in (0, 4, 8, 9, 10, 11, 1000)],
                             [1e-4, 5e-4, 9e-4, 1e-3, 1e-3, 1e-3, 1e-3], rtol=1e-6)
  one = state_lib.make_schedule(_cfg(**{"optim.lr": 1e-3, "optim.warmup": 1}))
  assert float(one(0)) == pytest.approx(1e-3)


def test_first_update_uses_lr_over_warmup():
  """Through the optimizer: Adam's first step is lr_0 * sign(g) with lr_0 = lr / warmup."""
  opt = state_lib.make_optimizer(_cfg(**{"optim.lr": 0.1, "optim.warmup": 4, "optim.clip": 0.0}))
  params = {"w": jnp.zeros(2)}
  up, _ = opt.update({"w": jnp.array([3.0, -0.5])}, opt.init(params), params)
  np.testing.assert_allclose(up["w"], [-0.025, 0.025], rtol=1e-5)


def test_schedule_cosine_decays_to_zero():
  cfg = _cfg(**{"optim.lr": 1e-3, "optim.warmup": 10, "optim.schedule": "cosine",
                "training.steps": 110})
  sched = state_lib.make_schedule(cfg)
  assert float(sched(10)) == pytest.approx(1e-3)
  assert float(sched(60)) == pytest.approx(5e-4, rel=1e-4)
  assert float(sched(110)) == pytest.approx(0.0, abs=1e-9)


def test_no_warmup():
  sched = state_lib.make_schedule(_cfg(**{"optim.lr": 2e-3, "optim.warmup": 0}))
  assert float(sched(0)) == pytest.approx(2e-3)


def test_ema_decay_formula():
  for n in (1, 2, 10, 1000, 10 ** 6):
    want = min(0.9999, (1 + n) / (10 + n))
    assert float(state_lib.ema_decay(n, 0.9999)) == pytest.approx(want, rel=1e-6)
  ema = {"w": jnp.zeros(3)}
  out = state_lib.ema_update(ema, {"w": jnp.ones(3)}, jnp.float32(0.25))
  np.testing.assert_allclose(out["w"], 0.75)


def test_optimizer_clips_then_adamw():
  """Clipping by the global norm before AdamW. Adam's first step is lr * g / (|g| + eps) per
  coordinate, so clipping shows only where it lifts a small coordinate to the size of eps: with
  g = (1e3, 3e-6), |g| = 1e3, clip 1 scales g to (1, 3e-9); eps = 1e-8 then gives the second
  coordinate lr * 3e-9 / (3e-9 + 1e-8) = 0.23 lr instead of lr * 3e-6 / (3e-6 + 1e-8) = 0.997 lr."""
  g = {"w": jnp.array([1e3, 3e-6])}
  params = {"w": jnp.zeros(2)}
  over = {"optim.lr": 0.1, "optim.warmup": 0, "optim.eps": 1e-8, "optim.weight_decay": 0.0}

  def first_update(clip):
    opt = state_lib.make_optimizer(_cfg(**over, **{"optim.clip": clip}))
    return np.asarray(opt.update(g, opt.init(params), params)[0]["w"], np.float64)

  def adam_first_step(grad):
    return -0.1 * grad / (np.abs(grad) + 1e-8)

  clipped = np.array([1.0, 3e-9])  # g * 1 / |g|
  np.testing.assert_allclose(first_update(1.0), adam_first_step(clipped), rtol=1e-4)
  np.testing.assert_allclose(first_update(0.0), adam_first_step(np.array([1e3, 3e-6])), rtol=1e-4)
  assert first_update(1.0)[1] == pytest.approx(-0.1 * 3 / 13, rel=1e-4)
  # A norm below the threshold is left alone.
  np.testing.assert_allclose(first_update(2e3), first_update(0.0), rtol=1e-6)


def test_init_state_from_model():
  cfg = _cfg(**{"model.hidden_size": 32, "model.n_heads": 2, "model.n_blocks": 1,
                "model.cond_dim": 16, "model.length": 32})
  from sedd_jax import diffusion
  graph = diffusion.get_graph(cfg.graph)
  model = state_lib.build_model(cfg, graph)
  defs, params, rest = state_lib.split_model(model)
  st = state_lib.init_state(cfg, params)
  assert int(st.step) == 0 and int(st.bad_steps) == 0 and int(st.skipped) == 0
  assert st.rng.shape == (2,) and st.rng.dtype == jnp.uint32
  for a, b in zip(jax.tree.leaves(st.params), jax.tree.leaves(st.ema)):
    np.testing.assert_array_equal(a, b)
  assert state_lib.param_count(params) == sum(x.size for x in jax.tree.leaves(params))
  assert defs.train != defs.eval  # dropout flags differ
