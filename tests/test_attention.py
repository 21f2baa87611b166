"""Attention backends: padding and masking, backend choice, shapes checked, packed segments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import qkv, real_positions
from sedd_jax.model import attention

# jit-compiled entry point: one compilation per call site instead of op-by-op dispatch
attend = jax.jit(attention.dot_product_attention, static_argnames=("backend", "chunk"))


@pytest.mark.parametrize("backend", ["xla", "chunked"])
def test_padded_keys_do_not_matter(backend):
  l = 24
  q, k, v = qkv(2, l, 2, 8)
  lengths = jnp.array([l, 9], jnp.int32)
  pad = (jnp.arange(l)[None, :] >= lengths[:, None])[:, :, None, None]
  k2 = jnp.where(pad, 1e3, k)
  v2 = jnp.where(pad, -7e2, v)
  a = attend(q, k, v, lengths, backend=backend, chunk=8)
  b = attend(q, k2, v2, lengths, backend=backend, chunk=8)
  real = real_positions(lengths, l)
  np.testing.assert_allclose(a * real, b * real, atol=1e-6, rtol=0)
  # and equal to attending over the real prefix alone
  short = attend(q[1:, :9], k[1:, :9], v[1:, :9], None,
                                          backend=backend, chunk=8)
  np.testing.assert_allclose(a[1:, :9], short, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["xla", "chunked"])
def test_no_lengths_is_full_length_and_empty_rows_are_zero(backend):
  q, k, v = qkv(2, 12, 2, 4)
  full = attend(q, k, v, None, backend=backend, chunk=5)
  same = attend(q, k, v, jnp.array([12, 12]), backend=backend, chunk=5)
  np.testing.assert_allclose(full, same, atol=1e-6, rtol=0)
  empty = attend(q, k, v, jnp.array([0, 12]), backend=backend, chunk=5)
  assert np.all(np.isfinite(empty))
  np.testing.assert_array_equal(empty[0], 0.0)


def test_matches_jax_reference_attention():
  q, k, v = qkv(2, 16, 2, 8)
  lengths = jnp.array([16, 11], jnp.int32)
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
    want = jax.jit(lambda q, k, v, n: jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=n, implementation="xla"))(q, k, v, lengths)
  for backend in ("xla", "chunked", "auto"):
    got = attend(q, k, v, lengths, backend=backend, chunk=4)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=backend)


def test_bf16_inputs_keep_dtype():
  q, k, v = qkv(1, 20, 2, 8, dtype=jnp.bfloat16)
  for backend in ("xla", "chunked", "cudnn"):  # cudnn falls back on CPU
    out = attend(q, k, v, None, backend=backend, chunk=8)
    assert out.dtype == jnp.bfloat16, backend


def test_backend_selection_on_cpu():
  assert attention.select_backend("xla", jnp.bfloat16, 8192, 64) == "xla"
  assert attention.select_backend("chunked", jnp.float32, 16, 64) == "chunked"
  if jax.default_backend() == "cpu":
    assert attention.select_backend("auto", jnp.bfloat16, 1024, 64) == "xla"
    assert attention.select_backend("auto", jnp.bfloat16, 4096, 64) == "chunked"
    assert attention.select_backend("cudnn", jnp.bfloat16, 512, 64) == "xla"
  with pytest.raises(ValueError, match="flash"):
    attention.select_backend("flash", jnp.float32, 16, 8)


def test_shape_errors_name_the_shapes():
  q, k, v = qkv(2, 8, 2, 4)
  with pytest.raises(ValueError, match=r"\(2, 8, 8\)"):
    attention.dot_product_attention(q.reshape(2, 8, 8), k, v, None, backend="xla")
  with pytest.raises(ValueError, match=r"lengths must be \(B,\)"):
    attention.dot_product_attention(q, k, v, jnp.ones((2, 1), jnp.int32), backend="xla")
  with pytest.raises(ValueError, match="integer"):
    attention.dot_product_attention(q, k, v, jnp.ones((2,)), backend="xla")


def _packed_row(lens, width):
  """(1, width) segment ids of sequences of lengths `lens` placed one after another."""
  seg = np.zeros((1, width), np.int32)
  start = 0
  for s, n in enumerate(lens, 1):
    seg[0, start:start + n] = s
    start += n
  return jnp.asarray(seg)


@pytest.mark.parametrize("backend", ["xla", "chunked", "cudnn"])  # cudnn falls back on CPU
def test_segments_isolate_sequences_forward_and_grad(backend):
  lens, width = (7, 12, 3), 26  # 4 padding positions at the end
  seg = _packed_row(lens, width)
  q, k, v = qkv(1, width, 2, 8, seed=3)
  w = jax.random.normal(jax.random.key(9), q.shape) * (seg != 0)[..., None, None]

  def f(q, k, v):
    o = attention.dot_product_attention(q, k, v, jnp.array([sum(lens)]), segment_ids=seg,
                                        backend=backend, chunk=5)
    return jnp.sum(o * w), o

  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  start = 0
  for n in lens:
    sl = slice(start, start + n)

    def alone(q, k, v, sl=sl):
      o = attention.xla_attention(q[:, sl], k[:, sl], v[:, sl])
      return jnp.sum(o * w[:, sl]), o

    (_, want), gw = jax.value_and_grad(alone, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(out[:, sl], want, atol=1e-5, rtol=0)
    for name, a, b in zip("qkv", grads, gw):
      np.testing.assert_allclose(a[:, sl], b[:, sl], atol=1e-5, rtol=0, err_msg=f"d{name}")
    start += n
  np.testing.assert_array_equal(out[:, sum(lens):], 0.0)  # padding queries: no keys
  for g in grads[1:]:  # padding keys get no gradient
    np.testing.assert_array_equal(g[:, sum(lens):], 0.0)


def test_segment_offsets_describe_contiguous_segments():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
  lens, offsets = attention.segment_offsets(seg, max_segments=4)
  np.testing.assert_array_equal(lens, [[2, 3, 1, -1], [8, -1, -1, -1]])
  np.testing.assert_array_equal(offsets, [[0, 2, 5, -1, -1], [0, -1, -1, -1, -1]])


def test_segment_ids_shape_is_checked():
  q, k, v = qkv(2, 8, 2, 4)
  with pytest.raises(ValueError, match=r"segment_ids must be \(B, L\)"):
    attention.dot_product_attention(q, k, v, segment_ids=jnp.ones((2, 7), jnp.int32))
