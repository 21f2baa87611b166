"""Length-bucketed batches (data.pad_to "full" and "bucket") and their padding fraction.

`BucketBatchIterator` (a grain `DatasetIterator`, built by `bucket_dataset`) reads the examples
of the stream (`pipeline.Examples`) in order; each goes to the first bucket whose boundary holds
its length; a bucket that reaches `batch_size` examples is emitted as one batch. `tokens` has
`<pad>` (= 1; the ligand track: the SMILES `<pad>` = 1) after each sequence; `lengths` counts the
real tokens, so the loss weight / attention mask is `arange(W) < lengths`. The batch width W
depends on `pad_to`:

* "full" (default; cfg.data.pad_to): W = L for every batch, one jit shape. Buckets then only
  group similar lengths (so a trimming step can cut work); the padding is 1 - mean(len) / L. With
  no boundaries configured, "full" uses a single bucket (plain batching in shuffled order).
* "bucket": W = the bucket's boundary, so there are as many distinct shapes as boundaries (5 by
  default: L/8, L/4, L/2, 3L/4, L) and jit compiles once per shape; the padding is much lower
  (`padding_fraction` gives both figures for a store).

The iterator's state (`get_state()`: the stream position, the positions waiting in the buckets
and the token counters) is a small JSON-able dict; `set_state` re-materialises the waiting
examples by position, so a restored iterator yields exactly the batches the saved one would have.
With a finite `num_epochs` the leftovers are emitted at the end (sorted by length, in batches of
`batch_size`; the last may hold fewer rows unless `drop_remainder`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from sedd_jax.data import tokenizers


def default_boundaries(length: int) -> tuple[int, ...]:
  """Bucket boundaries derived from the model length L: L/8, L/4, L/2, 3L/4, L (deduplicated)."""
  cands = [length // 8, length // 4, length // 2, (3 * length) // 4, length]
  return tuple(sorted({c for c in cands if c > 0}))


def bucket_boundaries(given: Sequence[int], length: int, pad_to: str) -> tuple[int, ...]:
  """The buckets of data.bucket_boundaries `given` (default: `default_boundaries` for "bucket",
  one bucket of width L for "full"), ending at the model length L; ValueError naming the key."""
  given = tuple(int(b) for b in given)
  if not given:
    return default_boundaries(length) if pad_to == "bucket" else (length,)
  if any(b <= 0 for b in given) or list(given) != sorted(set(given)):
    raise ValueError(f"data.bucket_boundaries must be increasing positive ints, got {given}")
  if given[-1] > length:
    raise ValueError(f"data.bucket_boundaries {given} exceed the model length {length}")
  return given if given[-1] == length else given + (length,)


def padding_fraction(lengths: np.ndarray, length: int,
                     boundaries: Sequence[int] | None = None) -> float:
  """Expected fraction of padding tokens in batches of sequences with `lengths`.

  Args:
    lengths: `(N,)` sequence lengths (cropped to `length` here).
    length: the model length L.
    boundaries: bucket widths (batches padded to the bucket's boundary, pad_to="bucket"); None
      for one width L (pad_to="full").

  Returns:
    1 - real tokens / batch tokens, ignoring partial final batches.
  """
  lengths = np.minimum(np.asarray(lengths, np.int64), length)
  if lengths.size == 0:
    return 0.0
  bounds = np.asarray(tuple(boundaries) if boundaries else (length,), np.int64)
  if bounds[-1] < length:
    bounds = np.append(bounds, length)
  widths = bounds[np.searchsorted(bounds, lengths, side="left")]
  return float(1.0 - lengths.sum() / widths.sum())


class BucketBatchIterator:  # mixed with grain.DatasetIterator in _grain_classes()
  """Buckets examples by length and emits padded batches; checkpointable (see module doc)."""

  def __init__(self, examples: Any, batch_size: int, boundaries: tuple[int, ...],
               pad_to: str, drop_remainder: bool, ligand_length: int):
    super().__init__()
    self._ex = examples
    self._batch_size = batch_size
    self._bounds = np.asarray(boundaries, np.int64)
    self._pad_to = pad_to
    self._drop_remainder = drop_remainder
    self._ligand_length = ligand_length
    self._position = 0
    self._buckets: list[list[int]] = [[] for _ in boundaries]
    self._leftovers: list[int] | None = None  # finite stream: sorted positions still to emit
    self._real = 0
    self._total = 0

  # --- grain DatasetIterator API ---
  def get_state(self) -> dict[str, Any]:
    return {"position": self._position, "buckets": [list(b) for b in self._buckets],
            "leftovers": None if self._leftovers is None else list(self._leftovers),
            "real_tokens": self._real, "total_tokens": self._total}

  def set_state(self, state: dict[str, Any]) -> None:
    buckets = [list(map(int, b)) for b in state["buckets"]]
    if len(buckets) != len(self._buckets):
      raise ValueError(f"iterator state has {len(buckets)} buckets, this pipeline has "
                       f"{len(self._buckets)} (boundaries {self._bounds.tolist()})")
    self._position = int(state["position"])
    self._buckets = buckets
    left = state.get("leftovers")
    self._leftovers = None if left is None else list(map(int, left))
    self._real = int(state.get("real_tokens", 0))
    self._total = int(state.get("total_tokens", 0))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    ex, b = self._ex, self._batch_size
    if self._leftovers is None:
      while ex.size is None or self._position < ex.size:
        pos = self._position
        self._position += 1
        j = int(np.searchsorted(self._bounds, ex.length_of(pos), side="left"))
        bucket = self._buckets[j]
        bucket.append(pos)
        if len(bucket) == b:
          self._buckets[j] = []
          return self._make_batch(bucket, int(self._bounds[j]))
      # End of a finite stream: emit what waits in the buckets, sorted by length.
      waiting = [p for bucket in self._buckets for p in bucket]
      self._buckets = [[] for _ in self._buckets]
      self._leftovers = sorted(waiting, key=lambda p: (ex.length_of(p), p))
    if not self._leftovers or (self._drop_remainder and len(self._leftovers) < b):
      raise StopIteration
    chunk, self._leftovers = self._leftovers[:b], self._leftovers[b:]
    longest = max(ex.length_of(p) for p in chunk)
    j = int(np.searchsorted(self._bounds, longest, side="left"))
    return self._make_batch(chunk, int(self._bounds[j]))

  def _make_batch(self, positions: list[int], bucket_width: int) -> dict[str, np.ndarray]:
    width = bucket_width if self._pad_to == "bucket" else self._ex.length
    items = [self._ex[p] for p in positions]
    tokens = np.full((len(items), width), tokenizers.PAD_ID, np.int32)
    lengths = np.zeros((len(items),), np.int32)
    for i, item in enumerate(items):
      seq = item["tokens"]
      tokens[i, :seq.size] = seq
      lengths[i] = seq.size
    batch = {"tokens": tokens, "lengths": lengths}
    self._real += int(lengths.sum())
    self._total += tokens.size
    for prefix in ("", "corpus_"):  # the pairs' ligands; the unpaired ligands of a corpus
      if f"{prefix}ligand_tokens" in items[0]:
        lig = np.full((len(items), self._ligand_length), tokenizers.SmilesTokenizer.pad_id,
                      np.int32)
        lig_len = np.zeros((len(items),), np.int32)
        for i, item in enumerate(items):
          t = item[f"{prefix}ligand_tokens"][:self._ligand_length]
          lig[i, :t.size] = t
          lig_len[i] = t.size
        batch[f"{prefix}ligand_tokens"], batch[f"{prefix}ligand_lengths"] = lig, lig_len
    return batch

  def padding_fraction(self) -> float:
    """Measured fraction of padding in the protein `tokens` emitted so far."""
    return 1.0 - self._real / self._total if self._total else 0.0


@functools.cache
def _grain_classes() -> tuple[type, type]:
  """(BucketBatchIterator mixed with grain.DatasetIterator, its grain IterDataset); grain is
  imported on first use."""
  import grain  # pylint: disable=g-import-not-at-top

  class GrainBucketBatchIterator(BucketBatchIterator, grain.DatasetIterator):
    pass

  class BucketBatchDataset(grain.IterDataset):
    """A grain IterDataset whose iterator is a GrainBucketBatchIterator."""

    def __init__(self, **kwargs):
      super().__init__()
      self._kwargs = kwargs

    def __iter__(self):
      return GrainBucketBatchIterator(**self._kwargs)

  return GrainBucketBatchIterator, BucketBatchDataset


def bucket_dataset(examples: Any, batch_size: int, boundaries: tuple[int, ...], pad_to: str,
                   drop_remainder: bool, ligand_length: int):
  """A grain IterDataset of the bucketed batches of `examples` (a `pipeline.Examples`)."""
  return _grain_classes()[1](examples=examples, batch_size=batch_size, boundaries=boundaries,
                             pad_to=pad_to, drop_remainder=drop_remainder,
                             ligand_length=ligand_length)
