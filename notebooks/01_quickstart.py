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
# # Quickstart: train a tiny SEDD protein model, sample, and look at the samples
#
# This notebook goes through what `python -m sedd_jax.train` and `python -m sedd_jax.sample` do,
# through the library's Python API:
#
# 1. load the `tiny` variant of `configs/uniref50.py`;
# 2. train it on the bundled UniProt proteins (`data/uniprot_mmseqs2_example.fasta.gz`, prepared
#    on first use) with `sedd_jax.train.train` (a few minutes on a laptop CPU);
# 3. plot the loss from the run's `metrics.jsonl`;
# 4. load the trained model with `sedd_jax.load` and sample proteins (`model.sample`);
# 5. score sequences (`model.score`, the negative ELBO) and a mutation scan
#    (`model.score_mutations`);
# 6. compare the samples with the training data (`sedd_jax.sampling.report`).
#
# It also runs as a plain script: `python notebooks/01_quickstart.py`.
#
# Set `SEDD_NOTEBOOK_FAST=1` for a smoke run of a few steps (what the tests do).
# The run goes to `runs/quickstart` (or `$SEDD_NOTEBOOK_WORKDIR/quickstart`); running the
# notebook again reuses the finished run.

# %%
import logging
import os
import pathlib

import jax
import matplotlib.pyplot as plt
import numpy as np

import sedd_jax
from sedd_jax import config as config_lib
from sedd_jax import train as train_lib
from sedd_jax.data import pipeline, store, tokenizers
from sedd_jax.data.prepare import repo_root
from sedd_jax.sampling import report
from sedd_jax.training import metrics

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
for name in ("absl", "jax._src.xla_bridge", "orbax"):
  logging.getLogger(name).setLevel(logging.WARNING)

FAST = os.environ.get("SEDD_NOTEBOOK_FAST") == "1"
ROOT = repo_root()
WORKDIR = pathlib.Path(os.environ.get("SEDD_NOTEBOOK_WORKDIR") or ROOT / "runs") / "quickstart"
print("fast mode:", FAST, "| workdir:", WORKDIR, "| devices:", jax.devices())

# %% [markdown]
# ## 1. Config
#
# A config is an `ml_collections.ConfigDict`, named as `FILE.py:VARIANT`. Overrides use dotted
# keys (the command line's `--config.training.steps=...`); a misspelt key fails at once.

# %%
overrides = {"wandb.mode": "disabled"}
if FAST:
  overrides.update({
    "training.steps": 20, "training.batch_size": 8, "training.log_every": 5,
    "training.eval_every": 10, "training.eval_batches": 1, "training.sample_every": 0,
    "training.ckpt_every": 20, "model.length": 64, "sampling.steps": 8,
  })
cfg = config_lib.load_config(str(ROOT / "configs/uniref50.py:tiny"), overrides)
print(cfg.model)
print("steps:", cfg.training.steps, "| batch:", cfg.training.batch_size)

# %% [markdown]
# ## 2. Train
#
# `train` prepares the data store if needed, builds the model and optimizer, trains with
# periodic validation and checkpoints, and resumes from the newest checkpoint when the workdir
# already holds a run (a finished run returns at once).

# %%
result = train_lib.train(cfg, WORKDIR,
                         compiler_options={"xla_backend_optimization_level": 0} if FAST else None)
print(result)
assert result.code == 0, result

# %% [markdown]
# ## 3. Loss curve
#
# Every `log_every` steps a `train` row, every `eval_every` steps an `eval` row (EMA weights on
# the validation split) goes to `metrics.jsonl`.

# %%
# %matplotlib inline
rows = metrics.read_metrics(WORKDIR / "metrics.jsonl")
train_rows = [r for r in rows if r["kind"] == "train"]
eval_rows = [r for r in rows if r["kind"] == "eval"]
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot([r["step"] for r in train_rows], [r["loss_per_token"] for r in train_rows], label="train")
ax.plot([r["step"] for r in eval_rows], [r["valid_loss_per_token"] for r in eval_rows], "o-",
        label="valid (EMA)")
ax.axhline(np.log(20), color="gray", ls=":", label="log 20 nats (uniform over 20 residues)")
ax.set_xlabel("step")
ax.set_ylabel("score-entropy loss per residue")
ax.legend()
plt.show()

# %% [markdown]
# ## 4. Sample
#
# `sedd_jax.load` takes a run folder (its newest checkpoint, EMA weights), a checkpoint folder
# or an exported bundle (`python -m sedd_jax.export`). `model.sample` runs the whole reverse
# process with the run's sampler settings; `lengths="from-data"` draws the lengths from the
# training data; only the 20 standard amino acids are generated. `prefix=`, `suffix=`,
# `motifs=`, `template=` and `infill=` condition the samples (notebook 03).

# %%
model = sedd_jax.load(WORKDIR)
print(model)
samples = model.sample(8 if FAST else 64, lengths="from-data", seed=0)
for i, s in enumerate(samples[:5]):
  print(f">sample_{i} length={len(s)}\n{s}")

# %% [markdown]
# ## 5. Score sequences and a mutation scan
#
# `model.score` estimates the negative ELBO of each sequence (nats, an upper bound on
# -log p; what `python -m sedd_jax.evaluate` reports). `model.score_mutations` gives
# log p(mutant) - log p(wild type) of each mutation ("A12G", 1-based; higher = fitter).

# %%
scores = model.score(samples[:4], seed=0)
for s, nelbo, per in zip(samples[:4], scores.nelbo, scores.per_residue):
  print(f"{s[:30]:32s} nelbo {nelbo:7.2f} nats, {per:.3f} per residue")

wild_type = samples[0]
positions = [1, 2] if FAST else [1, 2, 3, 4, 5]  # 1-based: every single mutant of these
scan = [f"{wild_type[p - 1]}{p}{aa}" for p in positions
        for aa in tokenizers.STANDARD_RESIDUES if aa != wild_type[p - 1]]
effects = model.score_mutations(wild_type, scan, seed=0)
for i in np.argsort(-effects.delta)[:5]:
  print(f"{effects.mutations[i]:6s} {effects.delta[i]:+.3f} +- {effects.se[i]:.3f} nats")

# %% [markdown]
# ## 6. Sample report
#
# `quality_report` compares samples with reference sequences: residue composition (KL), lengths,
# low complexity, diversity (distinct k-mers, pairwise identity) and novelty (nearest training
# sequence by 3-mer Jaccard). `plot_report` draws four panels.

# %%
L = model.max_length
tok = tokenizers.ProteinTokenizer()
train_store = store.open_store(pipeline.resolve_path(model.cfg.data.prepared), "train")
rng = np.random.default_rng(0)
ids = rng.choice(len(train_store), 300 if FAST else 2000, replace=False)
data = [tok.decode(train_store[int(i)])[:L] for i in ids]
rep = report.quality_report(samples, data)
print("composition KL(samples || data): %.4f nats" % rep["composition"]["kl_samples_data_nats"])
print("distinct k-mer ratio:", {k: round(v, 3)
                                for k, v in rep["diversity"]["distinct_kmer_ratio"].items()})
print("mean pairwise identity: %.3f" % rep["diversity"]["mean_pairwise_identity"])
print("nearest training 3-mer Jaccard (mean): %.3f" % rep["novelty"]["nearest_jaccard_mean"])
lc_s, lc_d = rep["low_complexity"]["samples"], rep["low_complexity"]["data"]
print("windows of 12 with entropy < 2.2 bits: samples %.3f, data %.3f"
      % (lc_s["frac_low_entropy_windows"], lc_d["frac_low_entropy_windows"]))
print("sequences with a homopolymer run >= 5: samples %.3f, data %.3f"
      % (lc_s["frac_seqs_with_homopolymer"], lc_d["frac_seqs_with_homopolymer"]))

# %%
png = WORKDIR / "report.png"
report.plot_report(rep, samples, data, png)
print("report figure:", png)
fig, ax = plt.subplots(figsize=(10, 8))
ax.imshow(plt.imread(png))
ax.axis("off")
plt.show()
