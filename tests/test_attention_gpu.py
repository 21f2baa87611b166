"""GPU only: the cuDNN backend equals xla within bfloat16 tolerance (forward and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sedd_jax.model import DDiT, attention

pytestmark = pytest.mark.gpu


def _need_cudnn():
  if not attention.cudnn_available(jnp.bfloat16, 64):
    pytest.skip("cuDNN flash attention does not apply on this GPU")


def _rel_err(a, b, mask):
  a = np.asarray(a, np.float32) * mask
  b = np.asarray(b, np.float32) * mask
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))


@pytest.mark.parametrize("length", [256, 1000])
@pytest.mark.parametrize("backend", ["cudnn", "chunked"])
def test_backend_matches_xla_in_bf16(backend, length):
  _need_cudnn()
  assert attention.select_backend("auto", jnp.bfloat16, length, 64) == "cudnn"
  b, h, d = 2, 4, 64
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(kk, (b, length, h, d), jnp.float32).astype(jnp.bfloat16)
             for kk in ks[:3])
  lengths = jnp.array([length, length - 77], jnp.int32)
  mask = np.asarray(jnp.arange(length)[None, :] < lengths[:, None], np.float32)[:, :, None, None]
  w = jax.random.normal(ks[3], q.shape, jnp.float32) * mask

  def run(be):
    def loss(q, k, v):
      o = attention.dot_product_attention(q, k, v, lengths, backend=be, chunk=128)
      return jnp.sum(o.astype(jnp.float32) * w), o
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  (_, o_ref), g_ref = run("xla")
  (_, o), g = run(backend)
  assert o.dtype == jnp.bfloat16
  assert _rel_err(o, o_ref, mask) < 2e-2
  assert _rel_err(g[0], g_ref[0], mask) < 3e-2  # dq at real queries
  assert _rel_err(g[1], g_ref[1], mask) < 3e-2  # dk at real keys (padded keys get 0)
  assert _rel_err(g[2], g_ref[2], mask) < 3e-2


def test_model_with_cudnn_matches_xla():
  _need_cudnn()
  cfg = dict(hidden_size=256, n_heads=4, n_blocks=2, cond_dim=64, dropout=0.0,
             scale_by_sigma=True, length=512, attention_chunk=0, dtype="bfloat16", remat="none")
  models = {}
  for be in ("xla", "auto"):
    models[be] = DDiT(dict(cfg, attention=be), 33, True, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for (_, a), (_, b) in zip(
      ((p, v) for p, v in nnx.iter_graph(models["xla"]) if isinstance(v, nnx.Param)),
      ((p, v) for p, v in nnx.iter_graph(models["auto"]) if isinstance(v, nnx.Param))):
    val = jnp.asarray(0.05 * rng.standard_normal(a.get_value().shape), jnp.float32)
    a.set_value(val)
    b.set_value(val)
  idx = jnp.asarray(rng.integers(0, 33, (4, 512)), jnp.int32)
  sigma = jnp.array([0.1, 0.5, 2.0, 5.0], jnp.float32)
  lengths = jnp.array([512, 300, 512, 17], jnp.int32)
  mask = np.asarray(jnp.arange(512)[None, :] < lengths[:, None], np.float32)[..., None]
  apply = nnx.jit(lambda m, i, s, n: m(i, s, n))
  outs = {}
  for be, m in models.items():
    m.eval()
    outs[be] = apply(m, idx, sigma, lengths)
  assert _rel_err(outs["auto"], outs["xla"], mask) < 2e-2
