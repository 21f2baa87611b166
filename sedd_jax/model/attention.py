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
* `chunked` (`sedd_jax.model.chunked_attention`): memory-efficient attention in pure JAX, a
  `lax.scan` over key/value chunks with an online softmax and a recomputing custom VJP, so
  activation memory is linear in L for forward AND backward.
* `auto`: `cudnn` where it applies, else `chunked` for L >= `CHUNKED_MIN_LENGTH`, else `xla`.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

from sedd_jax.model.chunked_attention import chunked_attention
from sedd_jax.model.chunked_attention import key_valid
from sedd_jax.model.chunked_attention import MASK_VALUE
from sedd_jax.model.chunked_attention import matmul_f32
from sedd_jax.model.chunked_attention import precision_of

log = logging.getLogger(__name__)

BACKENDS = ("auto", "xla", "cudnn", "chunked")
CHUNKED_MIN_LENGTH = 2048  # `auto` uses `chunked` from this length on (when cuDNN does not apply)
MAX_SEGMENTS = 16  # sequences per packed row on the cuDNN packed layout (the pipeline's cap)
CUDNN_SEGMENT_LAYOUTS = ("packed", "mask")
CUDNN_SEGMENT_LAYOUT = "mask"  # the public API; "packed" if benchmarks/packing.py finds it faster
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
  if msg not in _warned:
    _warned.add(msg)
    log.warning(msg)


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
    chunk: key/value chunk of `chunked`; 0 = `chunked_attention.choose_chunk(Lk)`.
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


def segment_mask(q_segments: jax.Array, k_segments: jax.Array) -> jax.Array:
  """(B, Lq), (B, Lk) int -> (B, 1, Lq, Lk) bool: same segment and the key is not padding (0)."""
  same = q_segments[:, :, None] == k_segments[:, None, :]
  return (same & (k_segments != 0)[:, None, :])[:, None]


def xla_attention(q, k, v, lengths=None, segment_ids=None):
  """Plain softmax attention. q (B, Lq, H, Dh), k/v (B, Lk, H, Dh), lengths (B,) | None,
  segment_ids (B, L) | None -> (B, Lq, H, Dh)."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  prec = precision_of(q.dtype)
  s = matmul_f32("bqhd,bkhd->bhqk", q, k, prec) * scale
  valid = key_valid(lengths, k.shape[0], k.shape[1])[:, None, None, :]
  if segment_ids is not None:
    valid = valid & segment_mask(segment_ids, segment_ids)
  s = jnp.where(valid, s, MASK_VALUE)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  e = jnp.where(valid, jnp.exp(s - m), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  p = e / jnp.where(denom > 0, denom, 1.0)
  o = matmul_f32("bhqk,bkhd->bqhd", p.astype(v.dtype), v, prec)
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
