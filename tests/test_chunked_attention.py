"""The chunked attention backend: forward and gradients against plain softmax attention,
the chunk choice, and memory linear in length."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import qkv, real_positions
from sedd_jax.model import attention
from sedd_jax.model import chunked_attention

log = logging.getLogger(__name__)


@pytest.mark.parametrize("length,chunk", [(64, 16), (50, 16), (37, 64), (40, 7)],
                         ids=["multiple", "not-multiple", "one-chunk", "odd-chunk"])
def test_chunked_matches_xla_forward_and_grad(length, chunk):
  q, k, v = qkv(2, length, 3, 8)
  lengths = jnp.array([length, length - 13], jnp.int32)
  real = real_positions(lengths, length)
  w = jax.random.normal(jax.random.key(7), q.shape) * real

  def loss(backend):
    def f(q, k, v):
      o = attention.dot_product_attention(q, k, v, lengths, backend=backend, chunk=chunk)
      return jnp.sum(o * w), o
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  (lx, ox), gx = loss("xla")(q, k, v)
  (lc, oc), gc = loss("chunked")(q, k, v)
  np.testing.assert_allclose(oc * real, ox * real, atol=1e-5, rtol=0)
  np.testing.assert_allclose(lc, lx, atol=1e-4, rtol=1e-5)
  for name, a, b in zip("qkv", gc, gx):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_choose_chunk():
  assert chunked_attention.choose_chunk(100) == 100
  assert chunked_attention.choose_chunk(1024) == 512
  assert chunked_attention.choose_chunk(600) == 304  # 2 chunks, little padding
  for l in (513, 1000, 4097, 16384):
    c = chunked_attention.choose_chunk(l)
    n = -(-l // c)
    assert c % 8 == 0 and c <= 512 and n * c - l < 8 * n


def _compiled_temp_bytes(backend: str, length: int) -> int:
  """Temp bytes of the compiled forward+backward at (B=1, L, H=1, Dh=8)."""
  spec = jax.ShapeDtypeStruct((1, length, 1, 8), jnp.float32)
  lspec = jax.ShapeDtypeStruct((1,), jnp.int32)

  def loss(q, k, v, lengths):
    o = attention.dot_product_attention(q, k, v, lengths, backend=backend, chunk=256)
    return jnp.sum(o * o)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec, lspec).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    pytest.skip("this backend gives no memory analysis")
  return int(stats.temp_size_in_bytes)


def test_compiled_memory_linear_for_chunked_quadratic_for_xla():
  mem = {(b, l): _compiled_temp_bytes(b, l) for b in ("xla", "chunked") for l in (1024, 8192)}
  log.info("compiled temp bytes (fwd+bwd, B=1, H=1, Dh=8): %s", mem)
  chunked_ratio = mem["chunked", 8192] / mem["chunked", 1024]
  xla_ratio = mem["xla", 8192] / mem["xla", 1024]
  assert chunked_ratio < 12, f"chunked grows x{chunked_ratio:.1f} from 1k to 8k (linear = 8)"
  assert xla_ratio > 40, f"xla grows x{xla_ratio:.1f} from 1k to 8k (quadratic = 64)"
  assert mem["chunked", 8192] * 10 < mem["xla", 8192]
