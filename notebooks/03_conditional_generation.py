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
# # Conditional generation: infilling a span and scaffolding a motif
#
# SEDD generates by unmasking; conditioning fixes some positions to given residues and lets the
# sampler generate the rest (the fixed positions are written back before every step, so the
# model always sees them). `sedd_jax.sampling.conditioning` builds the fixed positions
# (`Condition`: `tokens` and `mask`, one per position), `sedd_jax.sampling.sampler` samples.
# The same is available on the command line: `python -m sedd_jax.sample --infill FASTA`,
# `--motif SEQ@POS`, `--prefix`, `--suffix`, `--template`.
#
# The model is the quickstart's tiny run (`runs/quickstart`, trained here if it is not there
# yet; `SEDD_NOTEBOOK_FAST=1` trains a few steps only, so the generated residues are close to
# random: the point is where they go, not what they are).

# %%
import logging
import os
import pathlib

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import HTML, display

from sedd_jax import config as config_lib
from sedd_jax import train as train_lib
from sedd_jax.data import pipeline, store, tokenizers
from sedd_jax.data.prepare import repo_root
from sedd_jax.sampling import conditioning, sampler
from sedd_jax.training import checkpoint

logging.basicConfig(level=logging.WARNING, force=True)
FAST = os.environ.get("SEDD_NOTEBOOK_FAST") == "1"
ROOT = repo_root()
WORKDIR = pathlib.Path(os.environ.get("SEDD_NOTEBOOK_WORKDIR") or ROOT / "runs") / "quickstart"

# %% [markdown]
# ## The model
#
# The same config as the quickstart notebook: `train` returns at once when the run is finished.

# %%
overrides = {"wandb.mode": "disabled"}
if FAST:
  overrides.update({
    "training.steps": 20, "training.batch_size": 8, "training.log_every": 5,
    "training.eval_every": 10, "training.eval_batches": 1, "training.sample_every": 0,
    "training.ckpt_every": 20, "model.length": 64, "sampling.steps": 8,
  })
cfg = config_lib.load_config(str(ROOT / "configs/uniref50.py:tiny"), overrides)
result = train_lib.train(cfg, WORKDIR,
                         compiler_options={"xla_backend_optimization_level": 0} if FAST else None)
assert result.code == 0, result
model, cfg, graph, noise = checkpoint.load_for_inference(WORKDIR)
L = int(cfg.model.length)
STEPS = int(cfg.sampling.steps)
NUM = 4 if FAST else 8
tok = tokenizers.ProteinTokenizer()
allowed = tokenizers.residue_mask(graph.dim)  # the 20 standard amino acids
print("model length", L, "| sampling steps", STEPS)


# %% [markdown]
# Two small display functions for this notebook: the samples as coloured text (fixed residues
# on grey, generated ones in blue; with a reference, generated residues that happen to equal it
# are green), and a position-by-sample map of the same.

# %%
def show(title, samples, conds, reference=None):
  """`conds`: one Condition for all samples, or one per sample."""
  conds = conds if isinstance(conds, list) else [conds] * len(samples)
  rows = []
  for s, c in zip(samples, conds):
    cells = []
    for i, a in enumerate(s):
      if c.mask[i]:
        style = "background:#ddd;color:#000"
      elif reference is not None and i < len(reference) and reference[i] == a:
        style = "background:#c8f0c8;color:#060"
      else:
        style = "background:#dbe9ff;color:#036"
      cells.append(f'<span style="{style}">{a}</span>')
    rows.append("".join(cells))
  head = f"<div>template: {conds[0].describe()}</div>" if len(set(map(id, conds))) == 1 else ""
  ref = f"<div>original: {reference}</div>" if reference is not None else ""
  display(HTML(f"<b>{title}</b>{head}{ref}"
               f'<pre style="line-height:1.4">' + "\n".join(rows) + "</pre>"))


def plot_map(ax, title, samples, masks, reference=None):
  """0 = fixed, 1 = generated, 0.5 = generated and equal to `reference`."""
  n = min(len(s) for s in samples)
  grid = np.where(np.asarray(masks)[:, :n], 0.0, 1.0)
  if reference is not None:
    for r, s in enumerate(samples):
      same = np.array([a == b for a, b in zip(s[:n], reference[:n])])
      grid[r, same & (grid[r] == 1.0)] = 0.5
  ax.imshow(grid, aspect="auto", cmap="coolwarm", vmin=0, vmax=1, interpolation="nearest")
  ax.set_title(title)
  ax.set_xlabel("position")
  ax.set_ylabel("sample")


# %% [markdown]
# ## 1. Infill a span of a real protein
#
# A validation protein, with positions `[start, end)` regenerated and everything else kept
# (`conditioning.infill`; spans are 0-based and half-open, as Python slices).

# %%
valid = store.open_store(pipeline.resolve_path(cfg.data.prepared), "valid")
idx = next(i for i in range(len(valid)) if int(valid.lengths[i]) >= L)
reference = tok.decode(valid[idx])[:L]
span = (L // 4, L // 4 + L // 5)
cond = conditioning.infill(reference, [span], max_length=L)
fixed_tokens, fixed_mask = cond.padded(L)

infilled = sampler.sample_batched(
  jax.random.key(1), graph, noise, NUM, L, batch_size=NUM, steps=STEPS, model=model,
  fixed_tokens=fixed_tokens, fixed_mask=fixed_mask, lengths=np.full((NUM,), cond.length),
  allowed=allowed, progress=False)
infill_samples = [tok.decode(x[:cond.length]) for x in infilled]
assert all(s[:span[0]] == reference[:span[0]] and s[span[1]:] == reference[span[1]:]
           for s in infill_samples)
show(f"infill of positions {span[0]}:{span[1]}", infill_samples, cond, reference)
recovery = np.mean([[a == b for a, b in zip(s[span[0]:span[1]], reference[span[0]:span[1]])]
                    for s in infill_samples])
print(f"residues of the span equal to the original: {recovery:.1%} "
      f"(about 1/20 = 5% by chance)")

# %% [markdown]
# ## 2. Scaffold two motifs
#
# Motif segments at given positions (or drawn, with a start of `None`) inside a scaffold whose
# other positions are generated (`conditioning.motif`; the CLI's `--motif SEQ@POS`). Here a
# zinc-finger-like `CPxCG` at a fixed position and a `HHxxH` drawn anew for each sample.

# %%
rng = np.random.default_rng(0)
length = L
motif_conds = [conditioning.motif([("CPECG", 4), ("HHEMH", None)], length, rng=rng, max_length=L)
               for _ in range(NUM)]
tokens_, masks_ = conditioning.stack(motif_conds, L)
scaffolded = sampler.sample_batched(
  jax.random.key(2), graph, noise, NUM, L, batch_size=NUM, steps=STEPS, model=model,
  fixed_tokens=tokens_, fixed_mask=masks_, lengths=np.full((NUM,), length), allowed=allowed,
  progress=False)
motif_samples = [tok.decode(x[:length]) for x in scaffolded]
show("motif scaffolds (CPECG at 4, HHEMH drawn)", motif_samples, motif_conds)

# %%
# %matplotlib inline
fig, axes = plt.subplots(2, 1, figsize=(12, 5))
plot_map(axes[0], "infill: blue = fixed, red = generated, pale = generated and equal to the "
         "original", infill_samples, np.stack([cond.mask] * NUM), reference)
plot_map(axes[1], "motif scaffolding: blue = motif (fixed), red = generated scaffold",
         motif_samples, masks_)
fig.tight_layout()
plt.show()
