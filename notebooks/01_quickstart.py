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
# 4. load the EMA weights and sample proteins with `sedd_jax.sampling.sampler`;
# 5. compare the samples with the training data (`sedd_jax.sampling.report`).
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

from sedd_jax import config as config_lib
from sedd_jax import train as train_lib
from sedd_jax.data import pipeline, store, tokenizers
from sedd_jax.data.prepare import repo_root
from sedd_jax.sampling import report, sampler
from sedd_jax.training import checkpoint, metrics

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
# `load_for_inference` returns the model with its EMA weights, the config, and the diffusion
# graph and noise schedule. `sample_batched` runs the whole reverse process (one compiled
# `lax.fori_loop`) per batch. Lengths are drawn from the training data; `allowed` restricts
# the generated tokens to the 20 standard amino acids (as the sample CLI does).

# %%
model, cfg, graph, noise = checkpoint.load_for_inference(WORKDIR)
L = int(cfg.model.length)
tok = tokenizers.ProteinTokenizer()
train_store = store.open_store(pipeline.resolve_path(cfg.data.prepared), "train")

num = 8 if FAST else 64
rng = np.random.default_rng(0)
lengths = np.minimum(rng.choice(train_store.lengths, num), L).astype(np.int32)
allowed = tokenizers.residue_mask(graph.dim)  # the 20 standard amino acids

tokens = sampler.sample_batched(jax.random.key(0), graph, noise, num, L, batch_size=num,
                                steps=int(cfg.sampling.steps), model=model, lengths=lengths,
                                allowed=allowed)
samples = [tok.decode(tokens[i, :lengths[i]]) for i in range(num)]
for i, s in enumerate(samples[:5]):
  print(f">sample_{i} length={len(s)}\n{s}")

# %% [markdown]
# ## 5. Sample report
#
# `quality_report` compares samples with reference sequences: residue composition (KL), lengths,
# low complexity, diversity (distinct k-mers, pairwise identity) and novelty (nearest training
# sequence by 3-mer Jaccard). `plot_report` draws four panels.

# %%
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
from IPython.display import Image, display  # noqa: E402

png = WORKDIR / "report.png"
report.plot_report(rep, samples, data, png)
display(Image(filename=str(png)))
