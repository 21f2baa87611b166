"""Fused LayerNorm + modulate (`model.norm_impl`): values and gradients of the xla and Pallas
(interpreted on the CPU) implementations against today's LayerNorm + modulate, in the DDiT and
the protein-ligand model, and the fallback off GPUs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import has_gpu
from helpers import ddit_config as model_cfg
from helpers import ddit_out_and_grads, load_config, protein_ligand_config, protein_ligand_model
from sedd_jax.model import DDiT
from sedd_jax.model import norm_modulate as nm
from sedd_jax.training import sharding

# Small row blocks, so that the tests run several programs and backward chunks per program.
SMALL = nm.Tiling(fwd_rows=2, bwd_rows=2, bwd_chunks=2)


def inputs(b, l, h, per_token, dtype=jnp.float32, seed=0):
  """x (B, L, H) with a row mean and spread far from 0 and 1, w, shift, scale, a cotangent."""
  k = jax.random.split(jax.random.key(seed), 6)
  x = 3.0 * jax.random.normal(k[0], (b, l, h)) + jax.random.normal(k[5], (b, l, 1))
  w = 1.0 + 0.5 * jax.random.normal(k[1], (h,))
  mod = (b, l, h) if per_token else (b, 1, h)
  shift = jax.random.normal(k[2], mod).astype(dtype)
  scale = (0.5 * jax.random.normal(k[3], mod)).astype(dtype)
  return x.astype(dtype), w, shift, scale, jax.random.normal(k[4], (b, l, h))


@functools.partial(jax.jit, static_argnums=(0,))
def value_and_vjp(fn, x, w, shift, scale, cotangent):
  """(fn(x, w, shift, scale), its vjp at `cotangent` in fn's output dtype: dx, dw, dshift,
  dscale)."""
  y, vjp = jax.vjp(fn, x, w, shift, scale)
  return y, *vjp(cotangent.astype(y.dtype))


def close(got, want, rtol):
  """|got - want| <= rtol * max|want|, elementwise, in float32."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.max(np.abs(want)))


REFERENCE = functools.partial(nm.norm_modulate, impl="reference")
IMPLS = {"xla": functools.partial(nm.norm_modulate, impl="xla"),
         "pallas": functools.partial(nm.norm_modulate, impl="pallas", interpret=True,
                                     tiling=SMALL)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_row", "per_token"])
@pytest.mark.parametrize("l,h", [(8, 768), (5, 48)])  # DDiT-small's width; odd length and width
def test_values_and_gradients_equal_the_reference(impl, per_token, l, h):
  args = inputs(2, l, h, per_token)
  got = value_and_vjp(IMPLS[impl], *args)
  want = value_and_vjp(REFERENCE, *args)
  for name, a, b in zip(("y", "dx", "dw", "dshift", "dscale"), got, want):
    assert a.dtype == b.dtype, name
    close(a, b, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs_and_output(impl):
  """A bf16 residual stream and modulation, bf16 out: the reference's result cast to bf16
  (1 + scale in bf16 as `layers.modulate` computes it), gradients in the inputs' dtypes."""
  args = inputs(2, 4, 48, False, jnp.bfloat16, seed=1)
  fn = functools.partial(IMPLS[impl], out_dtype=jnp.bfloat16)
  got = value_and_vjp(fn, *args)
  want = value_and_vjp(functools.partial(REFERENCE, out_dtype=jnp.bfloat16), *args)
  assert [a.dtype for a in got] == [jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.bfloat16,
                                    jnp.bfloat16]
  for a, b in zip(got, want):
    close(a, b, 1e-2)  # bf16 results: a few ulps after float32 sums in another order


def test_shapes_are_checked():
  x, w, shift, scale, _ = inputs(2, 4, 8, False)
  with pytest.raises(ValueError, match=r"x must be \(B, L, H\)"):
    nm.norm_modulate(x[0], w, shift, scale, impl="xla")
  with pytest.raises(ValueError, match=r"w must be \(H,\) = \(8,\)"):
    nm.norm_modulate(x, w[:4], shift, scale, impl="xla")
  with pytest.raises(ValueError, match=r"shift and scale.*got \(2, 1, 8\) and \(2, 8\)"):
    nm.norm_modulate(x, w, shift, scale[:, 0], impl="xla")
  with pytest.raises(ValueError, match="impl 'triton': choose one of"):
    nm.norm_modulate(x, w, shift, scale, impl="triton")


@pytest.mark.skipif(has_gpu(), reason="the GPU runs Triton")
def test_pallas_needs_a_gpu_or_the_interpreter(caplog):
  x, w, shift, scale, _ = inputs(2, 4, 8, False)
  with pytest.raises(ValueError, match="needs a GPU.*resolve_impl"):
    nm.norm_modulate(x, w, shift, scale, impl="pallas")
  with caplog.at_level("WARNING"):
    assert nm.resolve_impl("pallas") == "xla"
  assert "norm_impl=pallas" in caplog.text and "using xla" in caplog.text
  with pytest.raises(ValueError, match="model.norm_impl 'triton'"):
    nm.resolve_impl("triton")


class _Device:
  def __init__(self, capability):
    self.platform = "cpu" if capability is None else "gpu"
    self.compute_capability, self.device_kind = capability, f"sm {capability}"


@pytest.mark.parametrize("backend, capability, dtype, want_auto, want_pallas", [
    ("cpu", None, jnp.bfloat16, "reference", "xla"),
    ("gpu", "9.0", jnp.bfloat16, "pallas", "pallas"),  # Hopper
    ("gpu", "8.0", jnp.bfloat16, "pallas", "pallas"),  # Ampere
    ("gpu", "9.0", jnp.float32, "reference", "pallas"),  # float32: the parity tests' arithmetic
    ("gpu", "7.0", jnp.bfloat16, "reference", "xla"),  # V100: no Pallas Triton kernels
])
def test_auto_picks_the_impl_by_device_and_dtype(monkeypatch, caplog, backend, capability, dtype,
                                                 want_auto, want_pallas):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(jax, "devices", lambda *a: [_Device(capability)])
  assert nm.resolve_impl("auto", dtype) == want_auto
  with caplog.at_level("WARNING"):
    assert nm.resolve_impl("pallas", dtype) == want_pallas
  assert ("using xla" in caplog.text) == (want_pallas == "xla")
  for impl in ("reference", "xla"):
    assert nm.resolve_impl(impl, dtype) == impl


def test_auto_falls_back_without_the_pallas_triton_backend(monkeypatch):
  """jax deprecates Pallas' Triton backend (0.11): once it is gone, `auto` is the reference."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [_Device("9.0")])
  assert nm.resolve_impl("auto", jnp.bfloat16) == "pallas"
  monkeypatch.setattr(nm, "plgpu", None)
  assert nm.resolve_impl("auto", jnp.bfloat16) == "reference"
  assert nm.resolve_impl("pallas", jnp.bfloat16) == "xla"


@pytest.mark.skipif(has_gpu(), reason="the GPU runs Triton")
def test_the_default_config_keeps_the_reference_norm_on_cpus():
  """`auto` is the configs' default; on this machine it is the parity-tested reference."""
  assert load_config("uniref50.py:small").model.norm_impl == "auto"
  model = DDiT(model_cfg(norm_impl="auto", dtype="bfloat16"), 9, True, nnx.Rngs(0))
  assert {b.norm_impl for b in model.blocks} == {"reference"}


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (the CPU simulates 8)")
@pytest.mark.parametrize("per_token", [False, True], ids=["per_row", "per_token"])
def test_pallas_keeps_a_batch_sharding(per_token):
  """On a 4-device mesh with the batch sharded (data parallel): the kernels run on each
  device's rows (x, y, dx, dshift, dscale stay sharded, nothing is gathered, one all-reduce
  sums dw) with the reference's values; without the partitioning rule everything came back
  replicated."""
  mesh = sharding.make_mesh(jax.devices()[:4])
  rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  x, w, shift, scale, g = inputs(4, 6, 48, per_token)
  args = [jax.device_put(a, replicated if a.ndim == 1 else rows) for a in (x, w, shift, scale, g)]
  step = jax.jit(functools.partial(value_and_vjp, IMPLS["pallas"]))
  hlo = step.lower(*args).compile().as_text()
  assert "all-gather" not in hlo and hlo.count("all-reduce(") == 1
  got = step(*args)
  assert [a.sharding.spec for a in got] == [P("data"), P("data"), P(), P("data"), P("data")]
  for a, b in zip(got, value_and_vjp(REFERENCE, x, w, shift, scale, g)):
    close(a, b, 1e-5)


def test_ddit_with_the_xla_norm_equals_the_reference():
  out_ref, g_ref = ddit_out_and_grads(norm_impl="reference", n_blocks=1)
  out_xla, g_xla = ddit_out_and_grads(norm_impl="xla", n_blocks=1)
  close(out_xla, out_ref, 1e-5)
  assert len(g_ref) == len(g_xla) > 0
  for a, b in zip(g_xla, g_ref):
    close(a, b, 1e-5)


@pytest.mark.skipif(has_gpu(), reason="the GPU runs Triton")
def test_ddit_pallas_falls_back_to_xla_off_gpus(caplog):
  with caplog.at_level("WARNING"):
    model = DDiT(model_cfg(norm_impl="pallas"), 9, True, nnx.Rngs(0))
  assert caplog.text.count("norm_impl=pallas") == 1
  assert {b.norm_impl for b in model.blocks} == {"xla"}
  assert model.output_layer.norm_impl == "xla"


def test_protein_ligand_model_with_the_xla_norm_equals_the_reference():
  """Both tracks' blocks, the cross-attention queries and the output layers."""
  b, lp, ll = 2, 6, 4
  k = jax.random.split(jax.random.key(3), 2)
  args = (jax.random.randint(k[0], (b, lp), 4, 29), jax.random.randint(k[1], (b, ll), 4, 10),
          jnp.array([0.3, 2.0]), jnp.array([1.1, 0.2]))
  outs = []
  for impl in ("reference", "xla"):
    cfg = protein_ligand_config(frozen=False, n_blocks=1)
    cfg.model.norm_impl = impl
    model = protein_ligand_model(cfg)
    model.eval()
    assert model.protein_cross[0].norm_impl == impl
    outs.append(nnx.jit(lambda m, *a: m(*a))(model, *args))
  for got, want in zip(outs[1], outs[0]):
    close(got, want, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("per_token", [False, True], ids=["per_row", "per_token"])
def test_pallas_on_the_gpu_equals_the_reference(per_token):
  """The Triton-compiled kernels (default tiling) at DDiT-small's width, which `auto` picks on
  this GPU (the test GPUs are Ampere or later)."""
  assert nm.resolve_impl("auto", jnp.bfloat16) == "pallas"
  args = inputs(4, 64, 768, per_token)
  got = value_and_vjp(functools.partial(nm.norm_modulate, impl="pallas"), *args)
  want = value_and_vjp(REFERENCE, *args)
  for a, b in zip(got, want):
    close(a, b, 1e-5)


@pytest.mark.skipif(jax.__version_info__ >= (0, 11) and not has_gpu(),
                    reason="jax >= 0.11 lowers Pallas Triton kernels only with a GPU")
@pytest.mark.parametrize("per_token", [False, True], ids=["per_row", "per_token"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_kernels_lower_to_triton(monkeypatch, per_token, dtype):
  """Forward and backward lower to Triton kernels for a CUDA device on any machine (jax runs
  the Pallas-to-Triton lowering here; compiling Triton to PTX needs the GPU): power-of-two
  blocks, supported primitives and dtypes at an odd width with an odd per-row length."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  x, w, shift, scale, g = (jax.ShapeDtypeStruct(a.shape, a.dtype if a.ndim == 1 else dtype)
                           for a in inputs(2, 6, 48, per_token))
  fn = functools.partial(nm.norm_modulate, impl="pallas", out_dtype=jnp.bfloat16)
  step = jax.jit(lambda *a: jax.vjp(fn, *a[:4])[1](a[4]))
  g = jax.ShapeDtypeStruct(g.shape, jnp.bfloat16)
  text = step.trace(x, w, shift, scale, g).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 2  # the forward and the backward kernel
