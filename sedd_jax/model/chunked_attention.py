"""Memory-efficient attention in pure JAX, the `chunked` backend of `model.attention`.

A `lax.scan` over key/value chunks with an online (running max / running sum) softmax and a
custom VJP that recomputes the chunks in the backward pass, so activation memory is linear in L
for forward AND backward. Any L: keys are padded to a multiple of the chunk internally and
masked. Also the masked-softmax pieces that the `xla` backend shares: `precision_of`,
`matmul_f32`, `key_valid`, `MASK_VALUE`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_CHUNK = 512  # target key/value chunk when `chunk` is 0
MASK_VALUE = -1e30  # finite, so fully-masked rows give no NaN (and no inf - inf)


def precision_of(dtype):
  """HIGHEST for float32 inputs (no TF32 on GPUs: float32 means float32), else DEFAULT."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def matmul_f32(spec: str, a, b, prec):
  """einsum of two operands with a float32 result."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=prec)


def key_valid(lengths, batch: int, lk: int, total: int | None = None) -> jax.Array:
  """(B, total) bool: key position < min(lengths, lk); total >= lk covers internal padding."""
  total = lk if total is None else total
  pos = jnp.arange(total, dtype=jnp.int32)[None, :]
  limit = jnp.full((batch,), lk, jnp.int32) if lengths is None else jnp.minimum(lengths, lk)
  return pos < limit[:, None]


def choose_chunk(length: int, target: int = DEFAULT_CHUNK) -> int:
  """A key/value chunk near `target` that wastes little padding for `length` keys.

  Splits `length` into ceil(length / target) nearly equal chunks, rounded up to a multiple of 8.
  """
  if length <= 0:
    raise ValueError(f"length must be positive, got {length}")
  if length <= target:
    return length
  n = -(-length // target)
  chunk = -(-length // n)
  return -(-chunk // 8) * 8


def chunked_attention(q, k, v, lengths=None, segment_ids=None, *, chunk: int = 0):
  """Memory-efficient attention: scan over key chunks, online softmax, recomputing VJP.

  q (B, Lq, H, Dh), k/v (B, Lk, H, Dh), lengths (B,) int or None, segment_ids (B, L) int or
  None -> (B, Lq, H, Dh). Activation memory (forward and backward) is O(B * Lq * H * chunk),
  linear in length.
  """
  lk = k.shape[1]
  chunk = int(chunk) if chunk else choose_chunk(lk)
  if chunk <= 0:
    raise ValueError(f"chunk must be positive, got {chunk}")
  if lengths is None:
    lengths = jnp.full((k.shape[0],), lk, jnp.int32)
  return _chunked(q, k, v, lengths, segment_ids, chunk)


def _split_chunks(x, chunk: int):
  """(B, Lk, H, Dh) -> (n, B, chunk, H, Dh), zero-padded at the end."""
  b, lk = x.shape[:2]
  n = -(-lk // chunk)
  pad = n * chunk - lk
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)


def _chunk_mask(lengths, segment_ids, batch: int, lk: int, chunk: int):
  """(n, B, chunk) bool key validity (internal padding and segment-0 keys masked) and the
  keys' segment ids (n, B, chunk) int32, or None without `segment_ids`."""
  n = -(-lk // chunk)
  valid = key_valid(lengths, batch, lk, n * chunk)
  if segment_ids is None:
    return jnp.moveaxis(valid.reshape(batch, n, chunk), 1, 0), None
  seg = jnp.pad(segment_ids, ((0, 0), (0, n * chunk - lk)))
  valid = valid & (seg != 0)
  return (jnp.moveaxis(valid.reshape(batch, n, chunk), 1, 0),
          jnp.moveaxis(seg.reshape(batch, n, chunk), 1, 0))


def _pair_valid(valid, q_seg, k_seg):
  """(B, c) key validity [+ (B, Lq), (B, c) segments] -> (B, 1, Lq or 1, c) bool."""
  valid = valid[:, None, None, :]
  if q_seg is None:
    return valid
  return valid & (q_seg[:, None, :, None] == k_seg[:, None, None, :])


def _chunked_forward(q, k, v, lengths, segment_ids, chunk):
  """Returns out (B, Lq, H, Dh) in q's dtype and lse (B, H, Lq) float32 (0 for empty rows)."""
  b, lq, h, d = q.shape
  scale = 1.0 / math.sqrt(d)
  prec = precision_of(q.dtype)
  ks, vs = _split_chunks(k, chunk), _split_chunks(v, chunk)
  masks, ksegs = _chunk_mask(lengths, segment_ids, b, k.shape[1], chunk)

  def body(carry, xs):
    m, l, acc = carry  # (B, H, Lq), (B, H, Lq), (B, H, Lq, Dh) float32
    kc, vc, valid, kseg = xs  # (B, c, H, Dh), (B, c, H, Dh), (B, c), (B, c) | None
    s = matmul_f32("bqhd,bkhd->bhqk", q, kc, prec) * scale
    valid = _pair_valid(valid, segment_ids, kseg)
    s = jnp.where(valid, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(valid, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    l = l * corr + jnp.sum(p, axis=-1)
    pv = matmul_f32("bhqk,bkhd->bhqd", p.astype(vc.dtype), vc, prec)
    acc = acc * corr[..., None] + pv
    return (m_new, l, acc), None

  init = (jnp.full((b, h, lq), MASK_VALUE, jnp.float32), jnp.zeros((b, h, lq), jnp.float32),
          jnp.zeros((b, h, lq, d), jnp.float32))
  (m, l, acc), _ = jax.lax.scan(body, init, (ks, vs, masks, ksegs))
  nonempty = l > 0
  safe_l = jnp.where(nonempty, l, 1.0)
  out = jnp.moveaxis(acc / safe_l[..., None], 1, 2).astype(q.dtype)  # (B, Lq, H, Dh)
  lse = jnp.where(nonempty, m + jnp.log(safe_l), 0.0)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunked(q, k, v, lengths, segment_ids, chunk):
  return _chunked_forward(q, k, v, lengths, segment_ids, chunk)[0]


def _chunked_fwd(q, k, v, lengths, segment_ids, chunk):
  out, lse = _chunked_forward(q, k, v, lengths, segment_ids, chunk)
  return out, (q, k, v, lengths, segment_ids, out, lse)


def _chunked_bwd(chunk, res, dout):
  q, k, v, lengths, segment_ids, out, lse = res
  b, lq, h, d = q.shape
  lk = k.shape[1]
  scale = 1.0 / math.sqrt(d)
  prec = precision_of(q.dtype)
  ks, vs = _split_chunks(k, chunk), _split_chunks(v, chunk)
  masks, ksegs = _chunk_mask(lengths, segment_ids, b, lk, chunk)
  # delta_i = sum_j P_ij dP_ij = <dout_i, out_i>
  delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))

  def body(dq, xs):
    kc, vc, valid, kseg = xs
    s = matmul_f32("bqhd,bkhd->bhqk", q, kc, prec) * scale
    p = jnp.where(_pair_valid(valid, segment_ids, kseg), jnp.exp(s - lse[..., None]), 0.0)
    dv = matmul_f32("bhqk,bqhd->bkhd", p.astype(dout.dtype), dout, prec)
    dp = matmul_f32("bqhd,bkhd->bhqk", dout, vc, prec)
    ds = p * (dp - delta[..., None]) * scale
    dq = dq + matmul_f32("bhqk,bkhd->bqhd", ds.astype(kc.dtype), kc, prec)
    dk = matmul_f32("bhqk,bqhd->bkhd", ds.astype(q.dtype), q, prec)
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq, (dks, dvs) = jax.lax.scan(body, jnp.zeros((b, lq, h, d), jnp.float32),
                                (ks, vs, masks, ksegs))
  n = dks.shape[0]
  dk = jnp.moveaxis(dks, 0, 1).reshape((b, n * chunk, h, d))[:, :lk]
  dv = jnp.moveaxis(dvs, 0, 1).reshape((b, n * chunk, h, d))[:, :lk]
  dlengths = np.zeros(lengths.shape, dtype=jax.dtypes.float0)
  dseg = None if segment_ids is None else np.zeros(segment_ids.shape, dtype=jax.dtypes.float0)
  return dq.astype(q.dtype), dk, dv, dlengths, dseg


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
