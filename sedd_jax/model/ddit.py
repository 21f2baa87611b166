"""DDiT, the SEDD transformer, in Flax NNX (numerically the reference's `SEDD` module).

indices (B, L) -> token embedding (B, L, H); sigma (B,) -> 256-dim sinusoid -> Linear-SiLU-Linear
-> SiLU = c (B, C); `n_blocks` adaLN-Zero blocks with rotary attention and a 4x GELU(tanh) MLP;
final LayerNorm + modulate + Linear -> (B, L, D) log score; absorbing graphs with
`scale_by_sigma` subtract log(expm1(sigma)) + log(D - 1); the entry at the input token is 0.
`DDiT.hidden_states` returns the residual stream after any block (0 = the token embedding, -1
= the output layer's input), by the forward's own code path stopped early.
The layers (LayerNorm, rotary, modulate, dropout, the sigma map, the head) are in
`sedd_jax.model.layers`; here the blocks and the model.

Precision: parameters are float32. Matmuls of the blocks (qkv, attention, out proj, MLP, adaLN)
run in `cfg.dtype` (bfloat16 or float32), or FP8 with `cfg.matmul=fp8` on FP8 GPUs; the residual
stream (stored in `cfg.residual_dtype`: by default, "auto", bfloat16 under bfloat16 compute on
GPUs and float32 elsewhere; added in float32), LayerNorms, rotary, the sigma map, the output
layer (logits) and the sigma scaling are float32, so the output is float32.
float32 matmuls use Precision.HIGHEST (no TF32 on GPUs). `model.norm_impl` picks how each
LayerNorm + modulate runs (`sedd_jax.model.norm_modulate`); the numbers agree to float32
rounding. `model.gate_grad` picks the backward of the gated residual adds
(`sedd_jax.model.gate_grad`), the same numbers up to the order of float32 sums.

State names mirror the PyTorch state_dict (see `torch_import`): `vocab_embed.embedding`,
`sigma_map.{mlp_in,mlp_out}`, `blocks.<n>.{norm1,attn_qkv,attn_out,norm2,mlp_in,mlp_out,
adaLN_modulation}`, `output_layer.{norm_final,linear,adaLN_modulation}`.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sedd_jax.model import attention as attention_lib
from sedd_jax.model import fp8 as fp8_lib
from sedd_jax.model import gate_grad as gate_lib
from sedd_jax.model import layers
from sedd_jax.model import norm_modulate as norm_lib

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("hidden_size", "n_heads", "n_blocks", "cond_dim")
DEFAULTS = {
    "dropout": 0.1,
    "scale_by_sigma": True,
    "length": 1024,
    "attention": "auto",
    "attention_chunk": 0,
    "dtype": "bfloat16",
    "remat": "none",
    "scan_blocks": False,
    "dropout_rng": "hash",
    "residual_dtype": "auto",
    "matmul": "default",
    "norm_impl": "auto",
    "gelu_impl": "saved_input",
    "gate_grad": "blocked",
}
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
REMAT_POLICIES = ("none", "mlp", "block", "block_save_dots")
RESIDUAL_DTYPES = ("auto", "float32", "bfloat16")  # auto: `resolve_residual_dtype`
# The blocks' qkv / out / MLP matmuls: in `dtype`, or FP8 (`fp8.fp8_matmul`) on FP8 GPUs.
MATMULS = ("default", "fp8")
MLP_RATIO = 4
# The allowed values of the model config's keys with a fixed set of choices.
CHOICES = {"dtype": tuple(DTYPES), "attention": attention_lib.BACKENDS, "remat": REMAT_POLICIES,
           "dropout_rng": layers.DROPOUT_RNGS, "residual_dtype": RESIDUAL_DTYPES,
           "matmul": MATMULS, "norm_impl": norm_lib.CHOICES, "gelu_impl": layers.GELU_IMPLS,
           "gate_grad": gate_lib.CHOICES}


def resolve_residual_dtype(residual: str, dtype) -> jnp.dtype:
  """The residual stream's dtype for `model.residual_dtype` (one of RESIDUAL_DTYPES) under
  compute `dtype`: "auto" is bfloat16 under bfloat16 compute on a CUDA GPU (half the bytes of
  the stream's many memory-bound passes: a 2.6% faster DDiT-small step on an H200, with the
  training curve on the reference's; BENCHMARKS.md) and float32 otherwise (the CPU and the
  float32 parity tests keep the reference's float32 stream)."""
  if residual != "auto":
    return DTYPES[residual]
  on_gpu = attention_lib.cuda_capability() is not None
  return jnp.bfloat16 if on_gpu and dtype == jnp.bfloat16 else jnp.float32


def cfg_value(cfg: Any, key: str):
  """cfg[key] for a ConfigDict / dict / attribute object; DEFAULTS for optional keys."""
  if isinstance(cfg, dict) or hasattr(cfg, "keys"):
    if key in cfg:
      return cfg[key]
  elif hasattr(cfg, key):
    return getattr(cfg, key)
  if key in DEFAULTS:
    return DEFAULTS[key]
  raise ValueError(f"model config has no key {key!r} (needs {REQUIRED_KEYS})")


def check_choices(**values: str) -> None:
  """ValueError naming `model.<key>` for each value that is not one of `CHOICES[key]`."""
  for key, value in values.items():
    if value not in CHOICES[key]:
      raise ValueError(f"model.{key} {value!r}: choose one of {CHOICES[key]}")


def check_packing(batch: int, length: int, segment_ids, positions):
  """Validates packed-row inputs of a (B, L) token array; returns them int32 (or None)."""
  out = []
  for name, a in (("segment_ids", segment_ids), ("positions", positions)):
    if a is not None:
      a = jnp.asarray(a)
      if a.shape != (batch, length) or not jnp.issubdtype(a.dtype, jnp.integer):
        raise ValueError(f"{name} must be (B, L) = ({batch}, {length}) integer; got shape "
                         f"{a.shape} dtype {a.dtype}")
      a = a.astype(jnp.int32)
    out.append(a)
  return tuple(out)


def _gelu_out(impl: str, layer: nnx.Linear, h: jax.Array) -> jax.Array:
  """layer(GELU_tanh(h)): the MLP's second half, h (B, L, 4H) -> (B, L, H); `impl` as
  `layers.gelu`."""
  return layer(layers.gelu(h, impl))


# model.gelu_impl -> the MLP's second half (made once here: the same object in every block;
# `impl` bound by position, as nnx.remat resolves no keyword arguments)
_GELU_OUT = {impl: functools.partial(_gelu_out, impl) for impl in layers.GELU_IMPLS}


class DDiTBlock(nnx.Module):
  """adaLN-Zero transformer block: x (B, L, H) -> (B, L, H) in x's dtype (the residual stream).

  Dropout: with `dropout_rng` None each dropout draws from its own stream forked from `rngs`;
  otherwise the block holds no random state and the caller passes one key per call
  (`dropout_key`), from which both dropout sites draw their bits by
  `layers.dropout_bits(dropout_rng)`
  (what DDiT does, so that its blocks can run as one `lax.scan`).
  """

  def __init__(self, dim: int, n_heads: int, cond_dim: int, dropout: float, dtype,
               attention: str, chunk: int, rngs: nnx.Rngs, remat_mlp: bool = False,
               dropout_rng: str | None = None, fp8: bool = False, norm_impl: str = "reference",
               gelu_impl: str = "reference", gate_grad: str = "xla"):
    self.n_heads = n_heads
    self.norm_impl = norm_impl
    self.gate_grad = gate_grad
    self.dtype = dtype
    self.attention = attention
    self.chunk = chunk
    dot = fp8_lib.fp8_dot_general if fp8 else jax.lax.dot_general
    self.norm1 = layers.LayerNorm(dim)
    self.attn_qkv = layers.linear(rngs, dim, 3 * dim, bias=False, dtype=dtype, dot_general=dot)
    self.attn_out = layers.linear(rngs, dim, dim, bias=False, dtype=dtype, dot_general=dot)
    drop_rngs = rngs if dropout_rng is None else None
    self.dropout_rng = dropout_rng
    self.dropout1 = nnx.Dropout(dropout, rngs=drop_rngs)
    self.norm2 = layers.LayerNorm(dim)
    self.mlp_in = layers.linear(rngs, dim, MLP_RATIO * dim, dtype=dtype, dot_general=dot)
    self.mlp_out = layers.linear(rngs, MLP_RATIO * dim, dim, dtype=dtype, dot_general=dot)
    self.dropout2 = nnx.Dropout(dropout, rngs=drop_rngs)
    self.adaLN_modulation = layers.linear(rngs, cond_dim, 6 * dim, dtype=dtype, zero=True)
    self._activation_out = _GELU_OUT[gelu_impl]
    if remat_mlp:  # keep only the pre-activation (B, L, 4H); recompute GELU in the backward
      self._activation_out = nnx.remat(self._activation_out)

  def _drop(self, layer: nnx.Dropout, x: jax.Array, key, site: int) -> jax.Array:
    if key is None:
      return layer(x)
    if layer.deterministic or layer.rate == 0.0:
      return x
    return layers.dropout(x, layer.rate, jax.random.fold_in(key, site), self.dropout_rng)

  def __call__(self, x, cos, sin, c, lengths=None, segment_ids=None, dropout_key=None):
    """x (B, L, H) f32 or bf16, cos/sin (L, Dh) | (B, L, Dh) f32, c (B, C) f32, lengths (B,) |
    None, segment_ids (B, L) | None (packed rows), dropout_key: a key | None (see the class
    docstring) -> (B, L, H) in x's dtype."""
    b, l, dim = x.shape
    mods = self.adaLN_modulation(c)[:, None, :]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, axis=-1)

    h = norm_lib.norm_modulate(x, self.norm1.scale[...], shift_msa, scale_msa,
                               impl=self.norm_impl, out_dtype=self.dtype)
    qkv = self.attn_qkv(h).reshape(b, l, 3, self.n_heads, dim // self.n_heads)
    q = layers.apply_rotary(qkv[:, :, 0], cos, sin)
    k = layers.apply_rotary(qkv[:, :, 1], cos, sin)
    v = qkv[:, :, 2]
    o = attention_lib.dot_product_attention(q, k, v, lengths, segment_ids=segment_ids,
                                            backend=self.attention, chunk=self.chunk)
    o = self.attn_out(o.reshape(b, l, dim))
    x = gate_lib.residual_add(x, gate_msa, self._drop(self.dropout1, o, dropout_key, 0),
                              impl=self.gate_grad)

    h = self.mlp_in(norm_lib.norm_modulate(x, self.norm2.scale[...], shift_mlp, scale_mlp,
                                           impl=self.norm_impl, out_dtype=self.dtype))
    h = self._activation_out(self.mlp_out, h)
    return gate_lib.residual_add(x, gate_mlp, self._drop(self.dropout2, h, dropout_key, 1),
                                 impl=self.gate_grad)


class DDiTFinalLayer(nnx.Module):
  """LayerNorm + modulate + Linear, float32: (B, L, H) -> (B, L, D) float32."""

  def __init__(self, dim: int, out_dim: int, cond_dim: int, rngs: nnx.Rngs,
               norm_impl: str = "reference"):
    self.norm_impl = norm_impl
    self.norm_final = layers.LayerNorm(dim)
    self.linear = layers.linear(rngs, dim, out_dim, zero=True)
    self.adaLN_modulation = layers.linear(rngs, cond_dim, 2 * dim, zero=True)

  def __call__(self, x, c):
    shift, scale = jnp.split(self.adaLN_modulation(c)[:, None, :], 2, axis=-1)
    return self.linear(norm_lib.norm_modulate(x, self.norm_final.scale[...], shift, scale,
                                              impl=self.norm_impl))


class DDiT(nnx.Module):
  """The SEDD transformer. See the module docstring.

  Args:
    cfg_model: the `model` sub-config (hidden_size, n_heads, n_blocks, cond_dim, dropout,
      scale_by_sigma, length, attention, attention_chunk, dtype, remat, scan_blocks, dropout_rng,
      residual_dtype); missing optional keys take `DEFAULTS`. scan_blocks: run the blocks as one
      `lax.scan` over their parameters stacked inside the trace (one block compiled instead of
      n_blocks; the parameters keep their per-block layout `blocks.<n>.*`). dropout_rng: how
      dropout bits are drawn (`layers.dropout_bits`; "hash" by default). residual_dtype: the
      dtype of the residual stream between blocks (LayerNorms and residual adds still compute
      in float32): "auto" (`resolve_residual_dtype`), "float32" or "bfloat16". matmul: "fp8"
      runs the blocks' qkv, out and MLP matmuls by `fp8_matmul` where `fp8_available()`, and
      falls back to `dtype` (with a warning) elsewhere. norm_impl: how LayerNorm + modulate
      run (`norm_modulate`): "auto" (`norm_modulate.resolve_impl`: "pallas" in bfloat16 on
      Ampere-or-later GPUs, else "reference"), "reference" (LayerNorm then modulate, autodiff),
      "xla" or "pallas" (one function with a hand-written backward; "pallas" falls back to
      "xla", with a warning, off such GPUs); in the blocks the result is cast to `dtype` right
      away (the next matmul's input dtype). gelu_impl: the MLP's GELU backward (`layers.gelu`):
      "saved_input" (the default: keeps only the GELU's input) or "reference" (autodiff).
      gate_grad: the backward of the gated residual adds x + gate * y (`gate_grad`):
      "blocked" (the default: a hand-written backward whose two-stage gate gradient avoids
      XLA's (B, L, H) -> (B, H, L) transposes; a 2-3% faster DDiT-small step on an H200) or
      "xla" (autodiff); the same numbers up to the order of the gate gradient's float32 sums.
    vocab_size: D = graph.dim (tokens + 1 for absorbing).
    absorb: whether the graph is absorbing (last index = mask).
    rngs: nnx.Rngs; `params` (or default) for init, `dropout` for dropout.
  """

  def __init__(self, cfg_model, vocab_size: int, absorb: bool, rngs: nnx.Rngs):
    get = lambda key: cfg_value(cfg_model, key)  # noqa: E731
    hidden, n_heads, n_blocks, cond_dim, chunk = (
        int(get(k)) for k in ("hidden_size", "n_heads", "n_blocks", "cond_dim", "attention_chunk"))
    dropout = float(get("dropout"))
    (dtype_name, attention, remat, dropout_rng, residual, matmul, norm_impl, gelu_impl,
     gate_grad) = (str(get(k)) for k in ("dtype", "attention", "remat", "dropout_rng",
                                         "residual_dtype", "matmul", "norm_impl", "gelu_impl",
                                         "gate_grad"))
    if hidden <= 0 or n_heads <= 0 or hidden % n_heads:
      raise ValueError(f"model.hidden_size {hidden} must be a positive multiple of "
                       f"model.n_heads {n_heads}")
    if (hidden // n_heads) % 2:
      raise ValueError(f"head dim hidden_size/n_heads = {hidden // n_heads} must be even (rotary)")
    check_choices(dtype=dtype_name, attention=attention, remat=remat, dropout_rng=dropout_rng,
                  residual_dtype=residual, matmul=matmul, norm_impl=norm_impl,
                  gelu_impl=gelu_impl, gate_grad=gate_grad)
    norm_impl = norm_lib.resolve_impl(norm_impl, DTYPES[dtype_name])
    fp8 = matmul == "fp8" and fp8_lib.fp8_available()
    if matmul == "fp8" and not fp8:
      log.warning("model.matmul=fp8: %s has no FP8 matmuls; using %s", jax.devices()[0].device_kind,
                  dtype_name)
    if chunk < 0:
      raise ValueError(f"model.attention_chunk {chunk} must be >= 0 (0 = chosen from length)")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"model.dropout {dropout} must be in [0, 1)")
    if vocab_size < 2:
      raise ValueError(f"vocab_size {vocab_size} must be >= 2")
    self.scale_by_sigma = bool(get("scale_by_sigma"))
    if self.scale_by_sigma and not absorb:
      raise ValueError("model.scale_by_sigma=True needs the absorbing graph (as in the reference);"
                       " set model.scale_by_sigma=False for graph.type='uniform'")
    self.hidden_size = hidden
    self.n_heads = n_heads
    self.vocab_size = int(vocab_size)
    self.absorb = bool(absorb)
    self.dtype = DTYPES[dtype_name]
    self.remat = remat
    self.scan_blocks = bool(get("scan_blocks"))
    self.residual_dtype = resolve_residual_dtype(residual, self.dtype)
    self.deterministic = False  # set by model.eval() / model.train(), as nnx.Dropout's
    # One dropout stream for all blocks: a key per forward pass, split into one key per block.
    self.dropout_stream = rngs["dropout"].fork() if dropout > 0 else None
    bound = 1.0 / math.sqrt(hidden)  # torch kaiming_uniform(a=sqrt(5)) on (D, H)
    self.vocab_embed = nnx.Embed(
        vocab_size, hidden, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
        embedding_init=lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound))
    self.sigma_map = layers.TimestepEmbedder(cond_dim, rngs)
    self.blocks = nnx.List([
        DDiTBlock(hidden, n_heads, cond_dim, dropout, self.dtype, attention, chunk, rngs,
                  remat_mlp=remat == "mlp", dropout_rng=dropout_rng, fp8=fp8, norm_impl=norm_impl,
                  gelu_impl=gelu_impl, gate_grad=gate_grad)
        for _ in range(n_blocks)])
    self.output_layer = DDiTFinalLayer(hidden, vocab_size, cond_dim, rngs, norm_impl)

  def __call__(self, indices: jax.Array, sigma: jax.Array, lengths: jax.Array | None = None, *,
               segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """indices (B, L) int, sigma (B,) float, lengths (B,) int | None -> (B, L, D) float32.

    Packed rows: segment_ids (B, L) int (0 = padding, 1..S the sequences of a row; attention
    stays within a sequence) and positions (B, L) int (each residue's index within its
    sequence; the rotary angles); None = one sequence per row at positions 0..L-1.
    """
    indices, sigma, lengths, segment_ids, positions = self._check_inputs(
        indices, sigma, lengths, segment_ids, positions)
    x, c = self._stream(indices, sigma, lengths, segment_ids, positions, len(self.blocks))
    return layers.score_head(self.output_layer(x, c), sigma, indices, self.scale_by_sigma)

  def hidden_states(self, indices: jax.Array, sigma: jax.Array,
                    lengths: jax.Array | None = None, *, layer: int = -1,
                    segment_ids: jax.Array | None = None,
                    positions: jax.Array | None = None) -> jax.Array:
    """The residual stream (B, L, H), in `residual_dtype`, at `layer` (`layer_blocks`): 0 = the
    token embedding, k = after block k, -1 = after the last block (the output layer's input);
    the other arguments as `__call__`, whose code path this is (stopped before the output
    layer), so `output_layer(hidden_states(..., layer=-1), c)` is `__call__`'s logits."""
    n = self.layer_blocks(layer)
    indices, sigma, lengths, segment_ids, positions = self._check_inputs(
        indices, sigma, lengths, segment_ids, positions)
    return self._stream(indices, sigma, lengths, segment_ids, positions, n)[0]

  def layer_blocks(self, layer: int) -> int:
    """How many blocks run before residual-stream state `layer`: the n_blocks + 1 states
    (token embedding, after block 1, ..., after block n_blocks) indexed as a Python list, so
    layer in [-(n_blocks + 1), n_blocks]; ValueError naming `layer` otherwise."""
    n = len(self.blocks)
    if (isinstance(layer, bool) or not isinstance(layer, numbers.Integral)
        or not -(n + 1) <= layer <= n):
      raise ValueError(f"layer {layer!r} is out of range for a model of {n} blocks: use "
                       f"{-(n + 1)}..{n} (0 = the token embedding, k = after block k, -1 = after "
                       f"the last block)")
    return int(layer) % (n + 1)

  def _check_inputs(self, indices, sigma, lengths, segment_ids, positions) -> tuple:
    """Checks the forward's inputs; returns them cast (int32 / float32 / int32, packing int32)."""
    indices = jnp.asarray(indices)
    sigma = jnp.asarray(sigma)
    if indices.ndim != 2 or not jnp.issubdtype(indices.dtype, jnp.integer):
      raise ValueError(f"indices must be (B, L) integer; got shape {indices.shape} "
                       f"dtype {indices.dtype}")
    b, l = indices.shape
    if sigma.shape != (b,):
      raise ValueError(f"sigma must be (B,) = ({b},) for indices {indices.shape}; "
                       f"got {sigma.shape}")
    if lengths is not None:
      lengths = jnp.asarray(lengths)
      if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be (B,) = ({b},) integer for indices {indices.shape}; "
                         f"got shape {lengths.shape} dtype {lengths.dtype}")
      lengths = lengths.astype(jnp.int32)
    segment_ids, positions = check_packing(b, l, segment_ids, positions)
    return indices.astype(jnp.int32), sigma.astype(jnp.float32), lengths, segment_ids, positions

  def _stream(self, indices, sigma, lengths, segment_ids, positions, n: int) -> tuple:
    """(residual stream (B, L, H) after the first `n` blocks, conditioning c (B, C) f32) of
    checked inputs (`_check_inputs`)."""
    x = self.vocab_embed(indices).astype(self.residual_dtype)  # (B, L, H)
    c = jax.nn.silu(self.sigma_map(sigma))  # (B, C) f32
    cos, sin = layers.rotary_cos_sin(indices.shape[1], self.hidden_size // self.n_heads,
                                     positions=positions)
    keys = None
    if self.dropout_stream is not None and not self.deterministic:
      keys = jax.random.split(self.dropout_stream(), len(self.blocks))
    return self._run_blocks(x, (cos, sin, c, lengths, segment_ids), keys, n), c

  def _run_blocks(self, x: jax.Array, args: tuple, keys: jax.Array | None,
                  n: int) -> jax.Array:
    """x (B, L, H) through the first `n` blocks: `block(x, *args, dropout_key=keys[i])`.

    `args` are broadcast to every block (the same values for each; per-call inputs such as
    lengths go here). With `scan_blocks`, one `lax.scan` over the blocks' states stacked along
    a new leading axis (the Linear weights already cast to `dtype`: half the copy in bf16, the
    same numbers); otherwise a Python loop. `remat` block policies wrap one block either
    way.
    """
    if n == 0:
      return x
    policy = {"block": None, "block_save_dots": jax.checkpoint_policies.checkpoint_dots}
    if not self.scan_blocks:
      def run(block, x, key):
        return block(x, *args, dropout_key=key)
      if self.remat in policy:
        run = nnx.remat(run, policy=policy[self.remat])
      for i in range(n):
        x = run(self.blocks[i], x, None if keys is None else keys[i])
      return x

    graphdef, _ = nnx.split(self.blocks[0])

    def stack(path, *v):  # Linear weights in the compute dtype, as each Linear casts them anyway
      names = {getattr(k, "key", None) for k in path}
      cast = self.dtype if names & {"kernel", "bias"} else v[0].dtype
      return jnp.stack([a.astype(cast) for a in v])

    stacked = jax.tree_util.tree_map_with_path(
        stack, *(nnx.split(self.blocks[i])[1] for i in range(n)))

    def body(x, xs):
      state, key = xs
      return nnx.merge(graphdef, state)(x, *args, dropout_key=key), None

    if self.remat in policy:
      body = jax.checkpoint(body, policy=policy[self.remat])
    return jax.lax.scan(body, x, (stacked, None if keys is None else keys[:n]))[0]
