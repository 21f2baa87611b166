"""The gated residual add's backwards (`model.gate_grad`): values and gradients of the blocked
impl against autodiff of the formula, its two-stage reduction in the compiled HLO, the batch
sharding, and the DDiT / protein-ligand models with the option."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from helpers import ddit_config as model_cfg
from helpers import ddit_out_and_grads, load_config, protein_ligand_config, protein_ligand_model
from sedd_jax import config as config_lib
from sedd_jax.model import DDiT
from sedd_jax.model import gate_grad as gg
from sedd_jax.training import sharding

# Blocks of 4, so that the test rows (8 or 16 long) have several of them.
IMPLS = {"xla": functools.partial(gg.residual_add, impl="xla"),
         "blocked": functools.partial(gg.residual_add, impl="blocked", block=4)}


def inputs(b, l, h, x_dtype=jnp.float32, dtype=jnp.float32, seed=0, gate_len=1):
  """x (B, L, H) in x_dtype; gate (B, gate_len, H) and y (B, L, H) in dtype; a cotangent in
  x's dtype (the output's)."""
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], (b, l, h)).astype(x_dtype)
  gate = (0.5 * jax.random.normal(k[1], (b, gate_len, h))).astype(dtype)
  y = (2.0 * jax.random.normal(k[2], (b, l, h)) + 0.5).astype(dtype)
  return x, gate, y, jax.random.normal(k[3], (b, l, h)).astype(x_dtype)


@functools.partial(jax.jit, static_argnums=(0,))
def value_and_vjp(fn, x, gate, y, cotangent):
  """(fn(x, gate, y), its vjp at `cotangent`: dx, dgate, dy)."""
  out, vjp = jax.vjp(fn, x, gate, y)
  return out, *vjp(cotangent)


def close(got, want, rtol):
  """|got - want| <= rtol * max|want|, elementwise, in float32."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.max(np.abs(want)))


def check_against_the_formula(impl, args, dgate_rtol):
  """The value, dx and dy bit for bit and in the formula's dtypes; dgate to `dgate_rtol` (the
  float32 sums run in another order)."""
  got = value_and_vjp(IMPLS[impl], *args)
  want = value_and_vjp(gg.formula, *args)
  for name, a, b in zip(("out", "dx", "dgate", "dy"), got, want):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    if name == "dgate":
      close(a, b, dgate_rtol)
    else:
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("l,h", [(16, 48), (5, 48), (8, 768)])  # odd L: one stage
def test_float32_gradients_equal_the_formula(impl, l, h):
  check_against_the_formula(impl, inputs(2, l, h), 1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16], ids=["f32res", "bf16res"])
def test_bfloat16_compute(impl, x_dtype):
  """The DDiT under bf16 compute: gate and y bf16 (the adaLN and branch matmuls' outputs), the
  residual stream float32 or bfloat16; dgate is bfloat16, so a float32 sum in another order
  moves it by at most an ulp."""
  check_against_the_formula(impl, inputs(2, 16, 48, x_dtype, jnp.bfloat16, seed=1), 1e-2)


def test_check_grads():
  """jax.test_util.check_grads (reverse mode against finite differences), float32."""
  x, gate, y, _ = inputs(2, 8, 8)
  check_grads(IMPLS["blocked"], (x, gate, y), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_other_gate_shapes_run_the_formula(impl):
  """A per-token gate (B, L, H) is not what the hand-written backwards handle: the formula."""
  check_against_the_formula(impl, inputs(2, 8, 16, gate_len=8), 1e-6)


def _compiled_vjp_hlo(impl, b=2, l=64, h=48):
  x, gate, y, g = inputs(b, l, h, dtype=jnp.bfloat16)
  fn = functools.partial(gg.residual_add, impl=impl, block=16)
  step = jax.jit(lambda x, gate, y, g: jax.vjp(fn, x, gate, y)[1](g))
  return step.lower(x, gate, y, g).compile().as_text()


def test_blocked_keeps_its_two_stage_reduction():
  """The first stage's (B, L / c, H) partial sums survive XLA's simplifier (without the
  barrier it merges the two reduces into the one over L, as for xla)."""
  assert "f32[2,4,48]" in _compiled_vjp_hlo("blocked")
  assert "f32[2,4,48]" not in _compiled_vjp_hlo("xla")


def test_bad_values_are_named():
  x, gate, y, _ = inputs(2, 4, 8)
  for removed in ("triton", "einsum", "pallas"):
    with pytest.raises(ValueError, match=f"impl '{removed}': choose one of"):
      gg.residual_add(x, gate, y, impl=removed)
    with pytest.raises(ValueError, match=f"model.gate_grad '{removed}'"):
      DDiT(model_cfg(gate_grad=removed), 9, True, nnx.Rngs(0))
    with pytest.raises(config_lib.ConfigError, match="model.gate_grad"):
      load_config("uniref50.py:tiny", {"model.gate_grad": removed})
  assert load_config("uniref50.py:small").model.gate_grad == "blocked"  # the default
  assert gg.CHOICES == config_lib.CHOICES["model.gate_grad"]


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (the CPU simulates 8)")
def test_blocked_keeps_a_batch_sharding():
  """On a 4-device mesh with the batch sharded (data parallel) the two-stage sum runs on each
  device's rows: nothing is gathered, every result stays sharded, the formula's values."""
  mesh = sharding.make_mesh(jax.devices()[:4])
  rows = NamedSharding(mesh, P("data"))
  args = [jax.device_put(a, rows) for a in inputs(4, 8, 48)]
  step = jax.jit(functools.partial(value_and_vjp, IMPLS["blocked"]))
  hlo = step.lower(*args).compile().as_text()
  assert "all-gather" not in hlo and "all-reduce(" not in hlo
  got = step(*args)
  assert [a.sharding.spec for a in got] == [P("data")] * 4
  for a, b in zip(got, value_and_vjp(gg.formula, *inputs(4, 8, 48))):
    close(a, b, 1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ddit_with_the_option_equals_xla(monkeypatch, dtype):
  """Two blocks (four gates), float32 or bf16 compute with a bf16 residual stream; blocks of 2
  (the test rows are 8 long)."""
  monkeypatch.setattr(gg, "BLOCK", 2)
  kw = dict(dtype=dtype, n_blocks=2)
  if dtype == "bfloat16":
    kw["residual_dtype"] = "bfloat16"
  out_ref, g_ref = ddit_out_and_grads(gate_grad="xla", **kw)
  out_new, g_new = ddit_out_and_grads(gate_grad="blocked", **kw)
  np.testing.assert_array_equal(np.asarray(out_new), np.asarray(out_ref))
  assert len(g_ref) == len(g_new) > 0
  for a, b in zip(g_new, g_ref):
    close(a, b, 1e-5 if dtype == "float32" else 2e-2)


def test_protein_ligand_model_passes_the_option(monkeypatch):
  monkeypatch.setattr(gg, "BLOCK", 2)
  cfg = protein_ligand_config(frozen=False, n_blocks=1)
  cfg.model.gate_grad = "blocked"
  model = protein_ligand_model(cfg)
  assert {b.gate_grad for b in model.protein_blocks} == {"blocked"}
