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
# # Parity: the JAX DDiT against the PyTorch SEDD reference
#
# The parity fixtures (`shared/parity/*.npz`, or folders named in `$SEDD_PARITY_FIXTURES`) hold
# inputs and the outputs that the PyTorch reference (louaaron/Score-Entropy-Discrete-Diffusion)
# produced for them. A `model` fixture holds every weight of a reference DDiT under its
# PyTorch `state_dict` name, a batch of token indices and noise levels, the reference's log
# score, and a loss through the model.
#
# Here we load those weights into a `sedd_jax` DDiT with `sedd_jax.model.torch_import`, run it,
# and put the two outputs side by side. If `torch` is installed, the same weights also go
# through the checkpoint converter (`python -m sedd_jax.convert`).

# %%
import os
import pathlib
import tempfile

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from sedd_jax import config as config_lib
from sedd_jax import diffusion, parity
from sedd_jax.data.prepare import repo_root
from sedd_jax.model import torch_import
from sedd_jax.training import state as state_lib

FAST = os.environ.get("SEDD_NOTEBOOK_FAST") == "1"
ROOT = repo_root()
print("fixture folders:", parity.fixture_dirs())

# %% [markdown]
# ## 1. Load a model fixture

# %%
fixtures = [parity.load_fixture(p) for p in parity.fixture_paths()]
model_fixtures = [fx for fx in fixtures if fx.kind == "model"]
print("fixtures:", ", ".join(f"{fx.name} ({fx.kind})" for fx in fixtures))
fx = next((f for f in model_fixtures if f.meta["graph"] == "absorb"), model_fixtures[0])
print(fx.name, fx.meta)
state_dict = {k[len("param/"):]: v for k, v in fx.inputs.items() if k.startswith("param/")}
print(len(state_dict), "weights, e.g.", {k: state_dict[k].shape for k in list(state_dict)[:4]})

# %% [markdown]
# ## 2. Build the DDiT from the fixture's settings and import the weights
#
# The shape comes from the fixture's `meta` (n_heads cannot be read from the weights; the
# others can: `torch_import.infer_model_config`). The model computes in float32 with plain XLA
# attention, as the reference on the CPU.

# %%
meta, mcfg = fx.meta, fx.meta["model"]
print("read from the weights:", torch_import.infer_model_config(state_dict))
cfg = config_lib.load_config(str(ROOT / "configs/uniref50.py:tiny"), {
  "graph.type": meta["graph"], "graph.tokens": meta["tokens"],
  "noise.type": meta["noise"], "noise.eps": meta.get("eps", 1e-3),
  "model.hidden_size": mcfg["hidden_size"], "model.n_heads": mcfg["n_heads"],
  "model.n_blocks": mcfg["n_blocks"], "model.cond_dim": mcfg["cond_dim"],
  "model.scale_by_sigma": mcfg["scale_by_sigma"], "model.dropout": 0.0,
  "model.dtype": "float32", "model.attention": "xla",
})
graph = diffusion.get_graph(cfg.graph)
noise = diffusion.get_noise(cfg.noise)
model = state_lib.build_model(cfg, graph)
torch_import.import_state_dict(model, state_dict)
model.eval()

indices = jnp.asarray(fx.inputs["indices"], jnp.int32)
sigma = jnp.asarray(fx.inputs["sigma"], jnp.float32)
jax_out = np.asarray(model(indices, sigma))
ref_out = fx.outputs["log_score"]
print("indices", indices.shape, "sigma", np.asarray(sigma), "-> log score", jax_out.shape)

# %% [markdown]
# ## 3. Side by side
#
# The fixtures' tolerance is `max|jax - torch| <= 1e-4 * max|torch|` (float32 computations;
# `parity.tolerance`). The loss row runs the fixture's perturbed batch through the model and
# the score-entropy loss (`diffusion.loss.score_entropy_loss`).

# %%
finite = np.isfinite(ref_out)  # the entry at the input token is 0 in both
x_loss = jnp.asarray(fx.inputs["loss/x"], jnp.int32)
log_score_loss = model(x_loss, noise.total_noise(jnp.asarray(fx.inputs["loss/t"])))
jax_loss = np.asarray(diffusion.loss.score_entropy_loss(
  graph, noise, log_score_loss, x_loss, jnp.asarray(fx.inputs["loss/x0"], jnp.int32),
  jnp.asarray(fx.inputs["loss/t"], jnp.float32)))
ref_loss = fx.outputs["loss"]

lines = ["| output | sequence | sigma or t | PyTorch (mean) | JAX (mean) | max abs diff | "
         "tolerance | ok |", "|---|---|---|---|---|---|---|---|"]
for b in range(ref_out.shape[0]):
  d = np.abs(jax_out[b] - ref_out[b])[finite[b]].max()
  tol = parity.tolerance(ref_out[b][finite[b]])
  lines.append(f"| log_score | {b} | {float(sigma[b]):.4f} | {ref_out[b][finite[b]].mean():.5f} | "
               f"{jax_out[b][finite[b]].mean():.5f} | {d:.2e} | {tol:.2e} | "
               f"{'yes' if d <= tol else 'NO'} |")
for b in range(ref_loss.shape[0]):
  d = abs(jax_loss[b] - ref_loss[b])
  tol = parity.tolerance(ref_loss)
  lines.append(f"| loss | {b} | {fx.inputs['loss/t'][b]:.4f} | {ref_loss[b]:.5f} | "
               f"{jax_loss[b]:.5f} | {d:.2e} | {tol:.2e} | {'yes' if d <= tol else 'NO'} |")
display(Markdown("\n".join(lines)))

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
ax = axes[0]
ax.scatter(ref_out[finite], jax_out[finite], s=2)
ax.set_xlabel("PyTorch log score")
ax.set_ylabel("JAX log score")
ax.set_title("every output entry")
diff = (jax_out - ref_out)[finite]
ax = axes[1]
ax.hist(diff, bins=60)
ax.set_xlabel("JAX - PyTorch")
ax.set_title(f"differences (max |d| = {np.abs(diff).max():.1e}, "
             f"tolerance {parity.tolerance(ref_out[finite]):.1e})")
ax = axes[2]
im = ax.imshow(np.where(finite[0], jax_out[0] - ref_out[0], 0.0).T, aspect="auto", cmap="RdBu",
               vmin=-np.abs(diff).max(), vmax=np.abs(diff).max())
ax.set_xlabel("position")
ax.set_ylabel("token")
ax.set_title("sequence 0: JAX - PyTorch")
fig.colorbar(im, ax=ax)
fig.tight_layout()
plt.show()

# %% [markdown]
# The same log scores, first sequence, first positions: the reference (left) and JAX (right)
# are indistinguishable at this scale.

# %%
n_pos = 12
fig, axes = plt.subplots(1, 2, figsize=(12, 3.5), sharey=True)
lo, hi = np.nanmin(ref_out[0][finite[0]]), np.nanmax(ref_out[0][finite[0]])
for ax, arr, title in ((axes[0], ref_out, "PyTorch reference"), (axes[1], jax_out, "sedd_jax")):
  ax.imshow(arr[0, :n_pos].T, aspect="auto", vmin=lo, vmax=hi)
  ax.set_title(title)
  ax.set_xlabel("position")
axes[0].set_ylabel("token")
plt.show()

# %% [markdown]
# ## 4. The same weights through the checkpoint converter
#
# `sedd_jax.convert.convert` reads a PyTorch checkpoint (`{'model': state_dict, 'ema': ...}` as
# the reference saves it, or a plain state_dict) and writes a `sedd_jax` inference checkpoint,
# which `load_for_inference` reads like a trained run. This needs `torch`
# (`pip install -e '.[torch]'`); without it the cell says so and does nothing.

# %%
try:
  import torch
except ImportError:
  torch = None
  print("torch is not installed: skipping the converter")
if torch is not None:
  from sedd_jax import convert
  from sedd_jax.training import checkpoint

  tmp = pathlib.Path(tempfile.mkdtemp())
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state_dict.items()}, "step": 0},
             tmp / "reference.pth")
  convert.convert(tmp / "reference.pth", tmp / "converted", cfg)
  converted, ccfg, cgraph, cnoise = checkpoint.load_for_inference(tmp / "converted")
  conv_out = np.asarray(converted(indices, sigma))
  print("converted checkpoint: max |converted - PyTorch| = %.2e; identical to the direct import: %s"
        % (np.abs(conv_out - ref_out)[finite].max(), np.array_equal(conv_out, jax_out)))
