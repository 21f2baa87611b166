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


@pytest.mark.parametrize("layout", attention.CUDNN_SEGMENT_LAYOUTS)
def test_cudnn_segments_isolate_sequences(layout):
  """Packed rows on cuDNN (both layouts): each sequence's output and gradients equal those of
  the sequence alone (xla, float32 reference), within bfloat16 tolerance."""
  _need_cudnn()
  b, length, h, d = 2, 256, 4, 64
  spans = [[(0, 100), (100, 60), (160, 90)], [(0, 256)]]  # row 0: 3 sequences + 6 padding
  seg = np.zeros((b, length), np.int32)
  for r, row in enumerate(spans):
    for s, (start, n) in enumerate(row, 1):
      seg[r, start:start + n] = s
  seg = jnp.asarray(seg)
  lengths = (seg > 0).sum(1).astype(jnp.int32)
  ks = jax.random.split(jax.random.key(1), 4)
  q, k, v = (jax.random.normal(kk, (b, length, h, d), jnp.float32).astype(jnp.bfloat16)
             for kk in ks[:3])
  w = jax.random.normal(ks[3], q.shape, jnp.float32) * (seg != 0)[..., None, None]

  def packed(q, k, v):
    o = attention.cudnn_attention(q, k, v, lengths, seg, layout=layout)
    return jnp.sum(o.astype(jnp.float32) * w), o

  (_, out), grads = jax.jit(jax.value_and_grad(packed, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  assert out.dtype == jnp.bfloat16
  for r, row in enumerate(spans):
    for start, n in row:
      sl = slice(start, start + n)

      def alone(q, k, v, sl=sl, r=r):
        f32 = lambda a: a[r:r + 1, sl].astype(jnp.float32)
        o = attention.xla_attention(f32(q), f32(k), f32(v))
        return jnp.sum(o * w[r:r + 1, sl]), o

      (_, want), gw = jax.value_and_grad(alone, argnums=(0, 1, 2), has_aux=True)(q, k, v)
      ones = np.ones((1, n, 1, 1), np.float32)
      assert _rel_err(out[r:r + 1, sl], want, ones) < 2e-2
      for g, g_ref in zip(grads, gw):
        assert _rel_err(g[r:r + 1, sl], g_ref[r:r + 1, sl], ones) < 3e-2
  np.testing.assert_array_equal(np.asarray(grads[1][0, 250:], np.float32), 0.0)  # padding keys


def test_model_packed_rows_match_sequences_alone_on_cudnn():
  """The DDiT (auto = cudnn, bf16) on a packed row against each sequence alone (xla, f32)."""
  _need_cudnn()
  cfg = dict(hidden_size=256, n_heads=4, n_blocks=2, cond_dim=64, dropout=0.0,
             scale_by_sigma=True, length=512, attention_chunk=0, remat="none")
  fast = DDiT(dict(cfg, attention="auto", dtype="bfloat16"), 33, True, nnx.Rngs(0))
  ref = DDiT(dict(cfg, attention="xla", dtype="float32"), 33, True, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for (_, a), (_, b) in zip(
      ((p, v) for p, v in nnx.iter_graph(fast) if isinstance(v, nnx.Param)),
      ((p, v) for p, v in nnx.iter_graph(ref) if isinstance(v, nnx.Param))):
    val = jnp.asarray(0.05 * rng.standard_normal(a.get_value().shape), jnp.float32)
    a.set_value(val)
    b.set_value(val)
  fast.eval()
  ref.eval()
  lens = (200, 130, 170)
  tok = rng.integers(4, 29, (1, 512)).astype(np.int32)
  seg = np.zeros((1, 512), np.int32)
  pos = np.zeros((1, 512), np.int32)
  start = 0
  for s, n in enumerate(lens, 1):
    seg[0, start:start + n], pos[0, start:start + n] = s, np.arange(n)
    start += n
  sigma = jnp.array([0.8], jnp.float32)
  out = nnx.jit(lambda m, *a: m(a[0], a[1], a[2], segment_ids=a[3], positions=a[4]))(
      fast, tok, sigma, jnp.array([start], jnp.int32), seg, pos)
  start = 0
  for n in lens:
    want = nnx.jit(lambda m, x, s: m(x, s))(ref, tok[:, start:start + n], sigma)
    assert _rel_err(out[:, start:start + n], want, np.ones((1, n, 1), np.float32)) < 3e-2
    start += n


@pytest.mark.parametrize("layout", attention.CUDNN_SEGMENT_LAYOUTS)
def test_fsdp_step_on_packed_rows_with_cudnn_equals_one_gpu(layout, monkeypatch):
  """FSDP over 2 GPUs, cuDNN attention on packed rows: the step compiles (XLA once sharded q/k/v
  on the head axis there, which cuDNN's partitioner rejects for the `mask` layout's bias) and
  its loss equals one GPU's within bfloat16 tolerance."""
  _need_cudnn()
  gpus = jax.devices("gpu")
  if len(gpus) < 2:
    pytest.skip("needs 2 GPUs")
  from helpers import step_config  # noqa: PLC0415
  from sedd_jax.training import step as step_lib  # noqa: PLC0415

  monkeypatch.setattr(attention, "CUDNN_SEGMENT_LAYOUT", layout)
  b, length = 8, 256
  rng = np.random.default_rng(0)
  seg = np.zeros((b, length), np.int32)
  pos = np.zeros((b, length), np.int32)
  for r in range(b):
    start = 0
    for s, n in enumerate((100, 70, 60), 1):
      seg[r, start:start + n], pos[r, start:start + n] = s, np.arange(n)
      start += n
  batch = {"tokens": np.where(seg > 0, rng.integers(4, 24, (b, length)), 1).astype(np.int32),
           "lengths": (seg > 0).sum(1).astype(np.int32), "segment_ids": seg, "positions": pos}
  losses = []
  for devices, fsdp in ((gpus[:1], False), (gpus[:2], True)):
    cfg = step_config(**{"model.hidden_size": 128, "model.n_heads": 2, "model.length": length,
                         "model.attention": "cudnn", "model.dtype": "bfloat16",
                         "data.pad_to": "pack", "training.batch_size": b, "training.fsdp": fsdp})
    s = step_lib.setup(cfg, devices=devices)
    _, m = s.train_step()(s.state, s.rest, s.put_batch(batch))
    losses.append(float(m["loss"]))
  np.testing.assert_allclose(losses[1], losses[0], rtol=2e-2)
