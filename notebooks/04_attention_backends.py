# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Attention backends: memory and time as the sequence length grows
#
# `sedd_jax.model.attention.dot_product_attention` has one entry point and several backends
# (`cfg.model.attention`):
#
# * `xla`: plain softmax attention; it materialises the (L, L) logits, so memory grows as L^2;
# * `chunked`: a scan over key/value chunks with an online softmax and a custom VJP that
#   recomputes chunks in the backward pass: memory linear in L, forward and backward;
# * `cudnn`: cuDNN's fused flash attention (NVIDIA GPU, sm80+, bf16/fp16 only);
# * `auto`: `cudnn` where it can run, else `chunked` from `CHUNKED_MIN_LENGTH` on, else `xla`.
#
# Below, one attention layer's forward + backward (`jax.grad` with respect to q, k, v) is
# compiled for each backend and length. Memory is XLA's compiled plan
# (`compiled.memory_analysis()`: temporaries, i.e. the activations the backward pass keeps and
# the work buffers), time is the median wall time of a few calls. On a CPU only `xla` and
# `chunked` run; with a GPU `cudnn` joins in bf16. `benchmarks/attention.py` is the full GPU
# benchmark (results in BENCHMARKS.md).

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from sedd_jax.model import attention

FAST = os.environ.get("SEDD_NOTEBOOK_FAST") == "1"
HEADS, HEAD_DIM, BATCH = 4, 32, 1
CHUNK = 128  # key/value chunk of `chunked` (cfg.model.attention_chunk; 0 = about 512)
LENGTHS = [128, 256, 512] if FAST else [256, 512, 1024, 2048, 4096]
REPEATS = 2 if FAST else 5
on_gpu = jax.default_backend() == "gpu"
DTYPE = jnp.bfloat16 if on_gpu else jnp.float32
BACKENDS = ["xla", "chunked"] + (["cudnn"] if attention.cudnn_available(DTYPE, HEAD_DIM) else [])
print("device:", jax.devices()[0].device_kind, "| dtype:", jnp.dtype(DTYPE).name,
      "| backends:", BACKENDS, "| lengths:", LENGTHS)
print("auto picks:", {L: attention.select_backend("auto", DTYPE, L, HEAD_DIM) for L in LENGTHS})


# %%
def measure(backend, length):
  shape = (BATCH, length, HEADS, HEAD_DIM)
  kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
  q, k, v, w = (jax.random.normal(key, shape, jnp.float32).astype(DTYPE)
                for key in (kq, kk, kv, kw))
  lengths = jnp.full((BATCH,), length, jnp.int32)

  def loss(q, k, v):
    out = attention.dot_product_attention(q, k, v, lengths, backend=backend,
                                         chunk=CHUNK if backend == "chunked" else 0)
    return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  mem = compiled.memory_analysis()
  jax.block_until_ready(compiled(q, k, v))  # warm-up
  times = []
  for _ in range(REPEATS):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    times.append(time.perf_counter() - t0)
  return {"backend": backend, "L": length,
          "temp_mib": mem.temp_size_in_bytes / 2**20 if mem is not None else float("nan"),
          "ms": 1e3 * float(np.median(times))}


results = [measure(b, L) for b in BACKENDS for L in LENGTHS]
lines = ["| backend | L | temporaries (MiB) | fwd+bwd (ms) |", "|---|---|---|---|"]
lines += [f"| {r['backend']} | {r['L']} | {r['temp_mib']:.2f} | {r['ms']:.2f} |" for r in results]
display(Markdown("\n".join(lines)))

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for b in BACKENDS:
  rs = [r for r in results if r["backend"] == b]
  axes[0].plot([r["L"] for r in rs], [r["temp_mib"] for r in rs], "o-", label=b)
  axes[1].plot([r["L"] for r in rs], [r["ms"] for r in rs], "o-", label=b)
for ax, label in ((axes[0], "compiled temporaries (MiB)"), (axes[1], "forward + backward (ms)")):
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sequence length L")
  ax.set_ylabel(label)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
axes[0].set_title(f"memory (B={BATCH}, H={HEADS}, Dh={HEAD_DIM}, {jnp.dtype(DTYPE).name})")
axes[1].set_title(f"time on {jax.devices()[0].device_kind}")
fig.tight_layout()
plt.show()

# %% [markdown]
# The `xla` temporaries grow about 4x per doubling of L (the L x L logits and probabilities kept
# for the backward pass); `chunked` grows about 2x (one chunk of `CHUNK` keys' logits at a time). In a
# training run the backend is chosen with `--config.model.attention=xla|chunked|cudnn|auto`
# (and `--config.model.attention_chunk`); `--config.model.remat` trades compute for the memory
# of the rest of the block.
