"""Optimizer, learning-rate schedule, EMA and the initial train state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sedd_jax import config as config_lib
from sedd_jax.training import state as state_lib


def _cfg(**over):
  cfg = config_lib.load_config("configs/uniref50.py:tiny")
  config_lib.apply_overrides(cfg, over)
  return cfg


def test_schedule_warmup_then_constant():
  sched = state_lib.make_schedule(_cfg(**{"optim.lr": 1e-3, "optim.warmup": 10}))
  np.testing.assert_allclose([float(sched(n)) for n in (0, 5, 10, 11, 1000)],
                             [0.0, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)


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
  cfg = _cfg(**{"optim.lr": 0.1, "optim.warmup": 0, "optim.clip": 1.0})
  opt = state_lib.make_optimizer(cfg)
  params = {"w": jnp.zeros(4)}
  s = opt.init(params)
  up, _ = opt.update({"w": jnp.array([100.0, 0.0, 0.0, 0.0])}, s, params)
  # Adam's first step is lr * sign(g) (the clip does not change the sign).
  np.testing.assert_allclose(up["w"], [-0.1, 0, 0, 0], atol=1e-6)
  clipped, _ = state_lib.make_optimizer(cfg).update({"w": jnp.full(4, 10.0)}, s, params)
  assert np.all(np.isfinite(clipped["w"]))


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
