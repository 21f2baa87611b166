"""Non-causal multi-head attention with per-sequence key lengths, four backends.

One entry point, `dot_product_attention(q, k, v, lengths, *, segment_ids, backend, chunk)`,
with q/k/v `(B, L, H, Dh)` and the output `(B, L, H, Dh)` in q's dtype. Keys at positions
`>= lengths[b]` are never attended to; queries at those positions get some finite value
(callers weight them out). A query with no key to attend to (`lengths[b] == 0`) gets zeros
from `xla` and `chunked`.

Packed rows (`segment_ids` (B, L) int, self-attention): several sequences share a row, segment
s = 1..S one sequence, 0 = padding. Query i attends to key j only if segment_ids[i] ==
segment_ids[j] != 0 (and j < lengths), so a sequence's output equals that of the sequence alone
(tests/test_attention.py). At most `MAX_SEGMENTS` sequences per row on the cuDNN packed layout.

Backends:
* `xla`: plain softmax attention; logits and softmax in float32. Memory O(L^2).
* `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention) for
  bfloat16/float16 on NVIDIA GPUs of compute capability >= 8.0 with a supported head size.
  Where it cannot run (CPU, float32, old GPU) it falls back, with one logged warning, to
  what `auto` would choose without cuDNN. With `segment_ids` it runs one of two layouts
  (`CUDNN_SEGMENT_LAYOUTS`, default `CUDNN_SEGMENT_LAYOUT`): "packed", cuDNN's ragged layout
  (per-segment offsets and lengths; jax's `jax._src.cudnn.fused_attention_stablehlo.
  dot_product_attention(q_offsets=, kv_offsets=)`, not exposed by `jax.nn.dot_product_attention`
  in jax 0.10/0.11; Hopper or newer), or "mask", a block-diagonal boolean mask passed to
  `jax.nn.dot_product_attention` (a (B, 1, L, L) bias inside cuDNN). "packed" falls back to
  "mask" before Hopper. benchmarks/packing.py measures both.
* `chunked`: memory-efficient attention in pure JAX: a `lax.scan` over key/value chunks
  with an online (running max / running sum) softmax and a custom VJP that recomputes the
  chunks in the backward pass, so activation memory is linear in L for forward AND backward.
  Any L: keys are padded to a multiple of the chunk internally and masked.
* `auto`: `cudnn` where it applies, else `chunked` for L >= `CHUNKED_MIN_LENGTH`, else `xla`.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("auto", "xla", "cudnn", "chunked")
CHUNKED_MIN_LENGTH = 2048  # `auto` uses `chunked` from this length on (when cuDNN does not apply)
DEFAULT_CHUNK = 512  # target key/value chunk when `chunk` is 0
_MASK_VALUE = -1e30  # finite, so fully-masked rows give no NaN (and no inf - inf)
MAX_SEGMENTS = 16  # sequences per packed row on the cuDNN packed layout (the pipeline's cap)
CUDNN_SEGMENT_LAYOUTS = ("packed", "mask")
CUDNN_SEGMENT_LAYOUT = "mask"  # the public API; "packed" if benchmarks/packing.py finds it faster
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
  if msg not in _warned:
    _warned.add(msg)
    log.warning(msg)


def _precision(dtype):
  """HIGHEST for float32 inputs (no TF32 on GPUs: float32 means float32), else DEFAULT."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _mm(spec: str, a, b, prec):
  """einsum of two operands with a float32 result."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=prec)


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


def cudnn_available(dtype, head_dim: int) -> bool:
  """Whether the cuDNN flash-attention kernel can run: CUDA GPU (sm80+), bf16/fp16, head_dim."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return False
  if head_dim % 8 != 0 or head_dim > 128:
    return False
  cc = cuda_capability()
  return cc is not None and cc[0] >= 8


def cuda_capability() -> tuple[int, int] | None:
  """(major, minor) CUDA compute capability of the default backend's first device, or None
  when it is not a CUDA GPU (CPU, TPU, ROCm) or reports no readable capability."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return None
  if dev.platform != "gpu":
    return None
  cc = getattr(dev, "compute_capability", None)
  if cc is None:  # not CUDA (e.g. ROCm)
    return None
  major, _, minor = str(cc).partition(".")
  try:
    return int(major), int(minor or 0)
  except ValueError:
    return None


def select_backend(backend: str, dtype, length: int, head_dim: int) -> str:
  """The backend that `dot_product_attention` runs for `backend` on these inputs.

  Returns one of `xla`, `cudnn`, `chunked`; raises ValueError for an unknown name.
  """
  if backend not in BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
  if backend in ("xla", "chunked"):
    return backend
  if cudnn_available(dtype, head_dim):
    return "cudnn"
  fallback = "chunked" if length >= CHUNKED_MIN_LENGTH else "xla"
  if backend == "cudnn":
    _warn_once(f"attention backend 'cudnn' cannot run here (platform {jax.default_backend()}, "
               f"dtype {jnp.dtype(dtype).name}, head_dim {head_dim}); using {fallback!r}")
  return fallback


def _check_inputs(q, k, v, lengths, segment_ids=None):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be (B, L, H, Dh); got {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} do not agree (B, L, H, Dh)")
  if lengths is not None:
    if lengths.shape != (q.shape[0],):
      raise ValueError(f"lengths must be (B,) = ({q.shape[0]},); got {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
      raise ValueError(f"lengths must be integer; got {lengths.dtype}")
  if segment_ids is not None:
    if q.shape[1] != k.shape[1]:
      raise ValueError(f"segment_ids need self-attention (Lq == Lk); got q {q.shape}, k {k.shape}")
    if segment_ids.shape != q.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be (B, L) = {q.shape[:2]} integer; got "
                       f"{segment_ids.shape} {segment_ids.dtype}")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          lengths: jax.Array | None = None, *,
                          segment_ids: jax.Array | None = None, backend: str = "auto",
                          chunk: int = 0) -> jax.Array:
  """Non-causal softmax attention, scale 1/sqrt(Dh), keys masked beyond `lengths`.

  Args:
    q: (B, Lq, H, Dh) queries.
    k: (B, Lk, H, Dh) keys.
    v: (B, Lk, H, Dh) values.
    lengths: (B,) int, number of real keys per sequence (padding at the end); None = all.
    segment_ids: (B, L) int sequence of each position of a packed row (0 = padding; needs
      Lq == Lk): attention stays within a segment. None = one sequence per row.
    backend: one of BACKENDS.
    chunk: key/value chunk of `chunked`; 0 = `choose_chunk(Lk)`.
  Returns:
    (B, Lq, H, Dh) in q's dtype.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  if lengths is not None:
    lengths = jnp.asarray(lengths)
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
  _check_inputs(q, k, v, lengths, segment_ids)
  if lengths is not None:
    lengths = lengths.astype(jnp.int32)
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  impl = select_backend(backend, q.dtype, k.shape[1], q.shape[-1])
  if impl == "xla":
    return xla_attention(q, k, v, lengths, segment_ids)
  if impl == "cudnn":
    return cudnn_attention(q, k, v, lengths, segment_ids)
  return chunked_attention(q, k, v, lengths, segment_ids, chunk=chunk)


def _key_valid(lengths, batch: int, lk: int, total: int | None = None) -> jax.Array:
  """(B, total) bool: key position < min(lengths, lk); total >= lk covers internal padding."""
  total = lk if total is None else total
  pos = jnp.arange(total, dtype=jnp.int32)[None, :]
  limit = jnp.full((batch,), lk, jnp.int32) if lengths is None else jnp.minimum(lengths, lk)
  return pos < limit[:, None]


def segment_mask(q_segments: jax.Array, k_segments: jax.Array) -> jax.Array:
  """(B, Lq), (B, Lk) int -> (B, 1, Lq, Lk) bool: same segment and the key is not padding (0)."""
  same = q_segments[:, :, None] == k_segments[:, None, :]
  return (same & (k_segments != 0)[:, None, :])[:, None]


def xla_attention(q, k, v, lengths=None, segment_ids=None):
  """Plain softmax attention. q (B, Lq, H, Dh), k/v (B, Lk, H, Dh), lengths (B,) | None,
  segment_ids (B, L) | None -> (B, Lq, H, Dh)."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  prec = _precision(q.dtype)
  s = _mm("bqhd,bkhd->bhqk", q, k, prec) * scale
  valid = _key_valid(lengths, k.shape[0], k.shape[1])[:, None, None, :]
  if segment_ids is not None:
    valid = valid & segment_mask(segment_ids, segment_ids)
  s = jnp.where(valid, s, _MASK_VALUE)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  e = jnp.where(valid, jnp.exp(s - m), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  p = e / jnp.where(denom > 0, denom, 1.0)
  o = _mm("bhqk,bkhd->bqhd", p.astype(v.dtype), v, prec)
  return o.astype(q.dtype)


def cudnn_attention(q, k, v, lengths=None, segment_ids=None, *, layout: str | None = None):
  """cuDNN flash attention (GPU, bf16/fp16 only); packed rows in `layout` (module docstring).

  layout: "packed" | "mask" for `segment_ids`; None = CUDNN_SEGMENT_LAYOUT.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  kw = {}
  if lengths is not None:
    kw = dict(query_seq_lengths=jnp.minimum(lengths, q.shape[1]),
              key_value_seq_lengths=jnp.minimum(lengths, k.shape[1]))
  if segment_ids is not None:
    layout = layout or CUDNN_SEGMENT_LAYOUT
    if layout not in CUDNN_SEGMENT_LAYOUTS:
      raise ValueError(f"cuDNN segment layout {layout!r}: choose one of {CUDNN_SEGMENT_LAYOUTS}")
    if layout == "packed" and _hopper_or_newer():
      return _cudnn_packed(q, k, v, segment_ids, scale)
    kw["mask"] = segment_mask(segment_ids, segment_ids)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=False,
                                      implementation="cudnn", **kw)


def _hopper_or_newer() -> bool:
  cc = cuda_capability()
  return cc is not None and cc[0] >= 9


def segment_offsets(segment_ids: jax.Array, max_segments: int = MAX_SEGMENTS):
  """Packed-layout descriptors of rows whose segments 1..S are contiguous runs.

  Args:
    segment_ids: (B, L) int, 0 = padding.
    max_segments: M, the most segments a row may hold; segments beyond M are not described
      (their queries get zeros from `_cudnn_packed`), so rows must respect it (the pipeline does).

  Returns:
    (seqlens (B, M) int32, offsets (B, M + 1) int32): segment s's length and start (s = 1..M in
    column s - 1); -1 where a row has fewer segments (cuDNN's convention).
  """
  seg = jnp.arange(1, max_segments + 1, dtype=jnp.int32)
  member = segment_ids[:, None, :] == seg[None, :, None]  # (B, M, L)
  lens = member.sum(-1).astype(jnp.int32)
  starts = jnp.argmax(member, axis=-1).astype(jnp.int32)
  present = lens > 0
  lens = jnp.where(present, lens, -1)
  starts = jnp.where(present, starts, -1)
  return lens, jnp.concatenate([starts, jnp.full((segment_ids.shape[0], 1), -1, jnp.int32)], 1)


def _cudnn_packed(q, k, v, segment_ids, scale):
  """cuDNN's packed (ragged) layout: one flash-attention problem per segment."""
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top

  lens, offsets = segment_offsets(segment_ids)
  real = (segment_ids != 0)[:, :, None, None]
  # cuDNN reads and writes only the segments: `where` gives positions outside them (padding)
  # exact zero gradients whatever the kernel leaves there.
  q, k, v = (jnp.where(real, a, jnp.zeros((), a.dtype)) for a in (q, k, v))
  out = fa.dot_product_attention(q, k, v, q_seqlen=lens, kv_seqlen=lens, q_offsets=offsets,
                                 kv_offsets=offsets, scale=scale,
                                 mask_type=fa.MaskType.PADDING, qkv_layout="BTNH")
  # Padding queries (segment 0) belong to no segment: cuDNN leaves them undefined.
  return jnp.where(real, out, jnp.zeros((), out.dtype))


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
  valid = _key_valid(lengths, batch, lk, n * chunk)
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
  prec = _precision(q.dtype)
  ks, vs = _split_chunks(k, chunk), _split_chunks(v, chunk)
  masks, ksegs = _chunk_mask(lengths, segment_ids, b, k.shape[1], chunk)

  def body(carry, xs):
    m, l, acc = carry  # (B, H, Lq), (B, H, Lq), (B, H, Lq, Dh) float32
    kc, vc, valid, kseg = xs  # (B, c, H, Dh), (B, c, H, Dh), (B, c), (B, c) | None
    s = _mm("bqhd,bkhd->bhqk", q, kc, prec) * scale
    valid = _pair_valid(valid, segment_ids, kseg)
    s = jnp.where(valid, s, _MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(valid, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    l = l * corr + jnp.sum(p, axis=-1)
    pv = _mm("bhqk,bkhd->bhqd", p.astype(vc.dtype), vc, prec)
    acc = acc * corr[..., None] + pv
    return (m_new, l, acc), None

  init = (jnp.full((b, h, lq), _MASK_VALUE, jnp.float32), jnp.zeros((b, h, lq), jnp.float32),
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
  prec = _precision(q.dtype)
  ks, vs = _split_chunks(k, chunk), _split_chunks(v, chunk)
  masks, ksegs = _chunk_mask(lengths, segment_ids, b, lk, chunk)
  # delta_i = sum_j P_ij dP_ij = <dout_i, out_i>
  delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))

  def body(dq, xs):
    kc, vc, valid, kseg = xs
    s = _mm("bqhd,bkhd->bhqk", q, kc, prec) * scale
    p = jnp.where(_pair_valid(valid, segment_ids, kseg), jnp.exp(s - lse[..., None]), 0.0)
    dv = _mm("bhqk,bqhd->bkhd", p.astype(dout.dtype), dout, prec)
    dp = _mm("bqhd,bkhd->bhqk", dout, vc, prec)
    ds = p * (dp - delta[..., None]) * scale
    dq = dq + _mm("bhqk,bkhd->bqhd", ds.astype(kc.dtype), kc, prec)
    dk = _mm("bhqk,bqhd->bkhd", ds.astype(q.dtype), q, prec)
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
