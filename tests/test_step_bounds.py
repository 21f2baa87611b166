"""benchmarks/step_bounds.py: its pseudo-tokens parse and check their partners, the fixed-scale
cast is exact where the scale says so, and the patches hold for one variant's trace only."""

import importlib.util
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT
from sedd_jax.model import fp8 as fp8_lib
from sedd_jax.model import gate_grad


@pytest.fixture(scope="module")
def step_bounds():
  """The script, loaded from its file with its neighbours (step_options, train_step) and
  configs/ importable, as when it runs."""
  saved = list(sys.path)
  sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "configs")]
  try:
    path = ROOT / "benchmarks" / "step_bounds.py"
    spec = importlib.util.spec_from_file_location("step_bounds", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.path[:] = saved


def test_pseudo_tokens_split_off_and_need_their_option(step_bounds):
  assert step_bounds.split_variant("loop+fp8+static") == ("loop+fp8", {"static"})
  assert step_bounds.split_variant("loop+gateblocked+block16") == ("loop+gateblocked", {"block16"})
  assert step_bounds.split_variant("loop+hash") == ("loop+hash", set())
  for bad, message in [("loop+static", "'static' needs 'fp8'"),
                       ("loop+block32", "need 'gateblocked'"),
                       ("loop+gateblocked+block16+block32", "one block size"),
                       ("loop+fp9", "unknown option 'fp9'")]:
    with pytest.raises(ValueError, match=message):
      step_bounds.split_variant(bad)


def test_static_cast_divides_by_its_fixed_power_of_two(step_bounds):
  x = jnp.array([1.5, -3.0, 0.0, 448.0], jnp.bfloat16)  # exact in float8_e4m3fn
  q, s = step_bounds._static_quantize(x, jnp.float8_e4m3fn)
  assert q.dtype == jnp.float8_e4m3fn and float(s) == 1.0
  np.testing.assert_array_equal(np.asarray(q, np.float32), [1.5, -3.0, 0.0, 448.0])
  g = jnp.array([3 * 2.0**-20, -2.0**-21], jnp.float32)  # a gradient's scale
  q, s = step_bounds._static_quantize(g, jnp.float8_e5m2)
  assert q.dtype == jnp.float8_e5m2 and float(s) == 2.0**-20
  np.testing.assert_array_equal(np.asarray(q, np.float32), [3.0, -0.5])


@pytest.mark.parametrize("fails", [False, True])
def test_patches_hold_for_one_variant_only(step_bounds, monkeypatch, fails):
  seen = []

  def fake_run(config, length, batch, variant, attention, dropout, steps, repeats):
    seen.append((variant, fp8_lib._quantize, gate_grad.BLOCK))
    if fails:
      raise RuntimeError("compile failed")
    return {"variant": variant}

  monkeypatch.setattr(step_bounds.step_options, "run", fake_run)
  original = (fp8_lib._quantize, gate_grad.BLOCK)
  try:
    row = step_bounds.run("small", 8, 2, "loop+gateblocked+fp8+static+block16", "cudnn", 0.1, 1, 1)
    assert row == {"variant": "loop+gateblocked+fp8+static+block16", "bench": "step_bounds"}
  except RuntimeError:
    assert fails
  assert seen == [("loop+gateblocked+fp8", step_bounds._static_quantize, 16)]
  assert (fp8_lib._quantize, gate_grad.BLOCK) == original
