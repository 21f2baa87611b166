"""FP8 matmuls: quantization error and gradients against the exact product, the dot_general
form, and the FP8 capability rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sedd_jax.model import attention
from sedd_jax.model import fp8 as fp8_lib


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_fp8_matmul_and_its_gradients_are_close_to_exact():
  """e4m3 operands (3 mantissa bits) and e5m2 output gradients (2 bits) with per-tensor scales:
  relative errors of a few percent, and really quantized (not exact)."""
  kx, kw, kr = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(kx, (64, 48), jnp.float32) * 3.0
  w = jax.random.normal(kw, (48, 40), jnp.float32) * 0.05
  r = jax.random.normal(kr, (64, 40), jnp.float32)
  y = fp8_lib.fp8_matmul(x, w)
  assert y.shape == (64, 40) and y.dtype == jnp.float32
  assert 1e-4 < _rel(y, x @ w) < 0.05
  dx, dw = jax.grad(lambda x, w: jnp.sum(fp8_lib.fp8_matmul(x, w) * r), argnums=(0, 1))(x, w)
  assert 1e-4 < _rel(dx, r @ w.T) < 0.1 and 1e-4 < _rel(dw, x.T @ r) < 0.1
  np.testing.assert_array_equal(fp8_lib.fp8_matmul(jnp.zeros_like(x), w), 0.0)
  y3 = fp8_lib.fp8_dot_general(x.reshape(4, 16, 48), w, (((2,), (0,)), ((), ())))
  np.testing.assert_array_equal(y3.reshape(64, 40), y)
  with pytest.raises(ValueError, match="fp8_dot_general handles"):
    fp8_lib.fp8_dot_general(x, w.T, (((1,), (1,)), ((), ())))


@pytest.mark.parametrize("capability,available", [
    (None, False), ((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_fp8_available_from_compute_capability_8_9(monkeypatch, capability, available):
  monkeypatch.setattr(attention, "cuda_capability", lambda: capability)
  assert fp8_lib.fp8_available() is available
