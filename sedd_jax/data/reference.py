"""Reference data of a trained model's config, for sampling reports and evaluation.

- `training_split(cfg)`: the training split of `cfg.data.prepared` (protein stores), memory-mapped;
  `training_sequences(cfg, limit)`: a sample of its sequences; `training_tokens(cfg)`: all its
  tokens in chunks (the unigram baseline), one chunk in memory at a time.
- `reference_pairs(cfg, split)`: a protein-ligand store's split (not empty) and its SMILES
  tokenizer.
- `require_sequences(st)`: a store's split, or StoreError naming the store and the split when it
  is empty, with the prepare command that makes one.
- `pad_tokens(seqs, width)`: id arrays -> a padded (N, width) batch and its lengths.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from sedd_jax.data import pipeline
from sedd_jax.data import store as store_lib
from sedd_jax.data import tokenizers

logger = logging.getLogger("sedd_jax.data.reference")


def training_split(cfg) -> store_lib.Store | None:
  """The training split of cfg.data.prepared, memory-mapped (nothing is read until used), or
  None when there is none."""
  try:
    root = pipeline.resolve_path(cfg.data.prepared)
    if not store_lib.is_prepared(root):
      return None
    return store_lib.Store(root, "train")
  except (OSError, ValueError) as e:
    logger.warning("training data unavailable (%s)", e)
    return None


def training_sequences(cfg, limit: int, seed: int = 0) -> list[np.ndarray] | None:
  """At most `limit` sequences of the training split, drawn without replacement (by `seed`),
  in store order, or None when there is no training split."""
  split = training_split(cfg)
  if split is None:
    return None
  idx = np.arange(len(split))
  if len(split) > limit:
    idx = np.sort(np.random.default_rng(seed).choice(len(split), limit, replace=False))
  return [np.asarray(split[int(i)]) for i in idx]


def training_tokens(cfg, chunk: int = 1 << 24) -> Iterator[np.ndarray] | None:
  """Every token of the training split, the sequences end to end, as consecutive `(<= chunk,)`
  slices of the memory map (one chunk read at a time), or None when there is no training
  split."""
  split = training_split(cfg)
  if split is None:
    return None
  tokens = split.track("protein").tokens
  return (tokens[i:i + chunk] for i in range(0, tokens.size, chunk))


def reference_pairs(cfg, split: str):
  """(store of `split` of cfg.data.prepared, its SmilesTokenizer); StoreError if unavailable
  or empty."""
  root = pipeline.resolve_path(cfg.data.prepared)
  try:
    st = store_lib.Store(root, split)
    tokenizer = st.smiles_tokenizer()
  except (OSError, ValueError, KeyError) as e:
    raise store_lib.StoreError(
        f"no prepared protein-ligand pairs at {root} ({e}); run python -m "
        "sedd_jax.data.prepare on the pairs CSV of the config") from None
  return require_sequences(st), tokenizer


def require_sequences(st: store_lib.Store) -> store_lib.Store:
  """`st`; StoreError naming its store and split when the split (valid or test: prepare never
  leaves train empty) holds no sequence or pair, with the prepare command that gives it some."""
  if len(st):
    return st
  source = st.manifest.get("source", {}).get("path") or "FILE"
  raise store_lib.StoreError(
      f"the {st.split} split of the store {st.root} is empty: prepare it again with a "
      f"{st.split} share, e.g. python -m sedd_jax.data.prepare --input {source} --output "
      f"{st.root} --{st.split}-fraction 0.02 --overwrite")


def pad_tokens(seqs: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
  """Sequences -> ((N, width) int32 padded with <pad>, (N,) int32 lengths)."""
  out = np.full((len(seqs), width), tokenizers.PAD_ID, np.int32)
  for i, x in enumerate(seqs):
    out[i, :len(x)] = x
  return out, np.array([len(x) for x in seqs], np.int32)
