"""Reference data of a trained model's config, for sampling reports and evaluation.

- `training_sequences(cfg)`: the training split of `cfg.data.prepared` (protein stores).
- `reference_pairs(cfg, split)`: a protein-ligand store's split and its SMILES tokenizer.
- `pad_tokens(seqs, width)`: id arrays -> a padded (N, width) batch and its lengths.
"""

from __future__ import annotations

import logging

import numpy as np

from sedd_jax.data import pipeline
from sedd_jax.data import store as store_lib
from sedd_jax.data import tokenizers

logger = logging.getLogger("sedd_jax.data.reference")


def training_sequences(cfg, limit: int | None = None, seed: int = 0):
  """The training split of cfg.data.prepared as (list of id arrays, (N,) lengths), or None
  when there is none; `limit` sequences drawn without replacement (by `seed`), in store order."""
  try:
    root = pipeline.resolve_path(cfg.data.prepared)
    if not store_lib.is_prepared(root):
      return None
    st = store_lib.Store(root, "train")
  except (OSError, ValueError) as e:
    logger.warning("training data unavailable (%s)", e)
    return None
  idx = np.arange(len(st))
  if limit is not None and len(st) > limit:
    idx = np.sort(np.random.default_rng(seed).choice(len(st), limit, replace=False))
  return [np.asarray(st[int(i)]) for i in idx], np.asarray(st.lengths)


def reference_pairs(cfg, split: str):
  """(store of `split` of cfg.data.prepared, its SmilesTokenizer); StoreError if unavailable."""
  root = pipeline.resolve_path(cfg.data.prepared)
  try:
    st = store_lib.Store(root, split)
    return st, st.smiles_tokenizer()
  except (OSError, ValueError, KeyError) as e:
    raise store_lib.StoreError(
        f"no prepared protein-ligand pairs at {root} ({e}); run python -m "
        "sedd_jax.data.prepare on the pairs CSV of the config") from None


def pad_tokens(seqs: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
  """Sequences -> ((N, width) int32 padded with <pad>, (N,) int32 lengths)."""
  out = np.full((len(seqs), width), tokenizers.PAD_ID, np.int32)
  for i, x in enumerate(seqs):
    out[i, :len(x)] = x
  return out, np.array([len(x) for x in seqs], np.int32)
