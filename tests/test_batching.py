"""Tests of sedd_jax.data.batching: bucket boundaries, bucketed batches and their state, padding."""

import numpy as np
import pytest

from helpers import pipeline_config
from sedd_jax.data import batching, pipeline, store


class _Stream:
  """A stand-in for `pipeline.Examples`: example i is `lengths[i]` tokens all equal to i + 4."""

  ligand = False

  def __init__(self, lengths, width):
    self.lengths, self.length, self.size = list(lengths), width, len(lengths)

  def length_of(self, position):
    return self.lengths[position]

  def __getitem__(self, position):
    return {"tokens": np.full(self.lengths[position], position + 4, np.int32)}


def _batches(stream, bounds, pad_to, batch_size=2, state=None):
  it = batching.BucketBatchIterator(stream, batch_size, bounds, pad_to, drop_remainder=False,
                                    ligand_length=8)
  if state is not None:
    it.set_state(state)
  return it


def test_default_and_configured_boundaries_and_their_errors():
  assert batching.default_boundaries(512) == (64, 128, 256, 384, 512)
  assert batching.default_boundaries(4) == (1, 2, 3, 4)
  assert batching.bucket_boundaries((), 64, "full") == (64,)
  assert batching.bucket_boundaries((), 64, "bucket") == (8, 16, 32, 48, 64)
  assert batching.bucket_boundaries((16, 32), 64, "full") == (16, 32, 64)
  assert batching.bucket_boundaries((16, 64), 64, "bucket") == (16, 64)
  with pytest.raises(ValueError, match=r"data.bucket_boundaries must be increasing"):
    batching.bucket_boundaries((32, 16), 64, "bucket")
  with pytest.raises(ValueError, match=r"data.bucket_boundaries \(16, 128\) exceed .* 64"):
    batching.bucket_boundaries((16, 128), 64, "bucket")


def test_buckets_emit_full_batches_then_the_leftovers_sorted_by_length():
  """Lengths 3, 9, 4, 10, 2 in buckets (4, 12), batches of 2: [0, 2] (bucket 4) once full,
  then [1, 3] (bucket 12); the leftover [4] at the end; widths 4 / 12 ("bucket") or 12."""
  stream = _Stream([3, 9, 4, 10, 2], 12)
  got = list(_batches(stream, (4, 12), "bucket"))
  assert [b["tokens"].shape for b in got] == [(2, 4), (2, 12), (1, 4)]
  assert [b["lengths"].tolist() for b in got] == [[3, 4], [9, 10], [2]]
  np.testing.assert_array_equal(got[0]["tokens"], [[4, 4, 4, 1], [6, 6, 6, 6]])
  it = _batches(stream, (4, 12), "full")
  full = list(it)
  assert [b["tokens"].shape for b in full] == [(2, 12)] * 2 + [(1, 12)]
  assert it.padding_fraction() == pytest.approx(1 - 28 / 60)
  # Leftovers of several buckets come out shortest first.
  tail = list(_batches(_Stream([9, 3, 10, 2], 12), (4, 12), "bucket", batch_size=3))
  assert [b["lengths"].tolist() for b in tail] == [[2, 3, 9], [10]]
  assert [b["tokens"].shape[1] for b in tail] == [12, 12]  # the longest row's bucket


def test_a_restored_state_yields_the_same_remaining_batches():
  stream = _Stream([3, 9, 4, 10, 2, 11, 5, 1, 7], 12)
  it = _batches(stream, (4, 8, 12), "bucket")
  first = next(it)
  state = it.get_state()
  rest = [b["tokens"].tolist() for b in it]
  assert state["buckets"] == [[], [], [1]] and first["lengths"].tolist() == [3, 4]
  again = _batches(stream, (4, 8, 12), "bucket", state=state)
  assert [b["tokens"].tolist() for b in again] == rest
  with pytest.raises(ValueError, match="iterator state has 3 buckets, this pipeline has 2"):
    _batches(stream, (4, 12), "bucket", state=state)


def test_bucket_widths_and_lower_padding(faa_store):
  cfg = pipeline_config(faa_store, length=512)
  it = pipeline.make_iterator(cfg, "train", 4, seed=0, pad_to="bucket")
  bounds = batching.default_boundaries(512)
  assert bounds == (64, 128, 256, 384, 512)
  widths = set()
  for _ in range(30):
    b = next(it)
    w = b["tokens"].shape[1]
    widths.add(w)
    assert w in bounds and b["lengths"].max() <= w
    i = bounds.index(w)
    assert i == 0 or b["lengths"].min() > bounds[i - 1]
  assert len(widths) > 1


def test_measured_padding_over_one_pass_matches_the_formula(faa_store):
  """One pass over the split: width L for every row gives exactly `padding_fraction(lengths, L)`;
  buckets give what the emitted batches hold, at least the formula's (the leftovers at the end
  of the pass are padded to their longest row's bucket) and less than width L."""
  cfg = pipeline_config(faa_store, length=512)
  lengths = np.minimum(store.open_store(faa_store, "train").lengths, 512)  # longer ones are cropped
  assert lengths.min() < 64 < lengths.max() == 512  # several buckets and crops in use
  full = pipeline.make_iterator(cfg, "train", 4, seed=0, num_epochs=1)
  rows = sum(b["tokens"].shape[0] for b in full)
  assert rows == lengths.size
  assert full.padding_fraction() == pytest.approx(1 - lengths.sum() / (512 * lengths.size),
                                                  rel=1e-12)
  assert full.padding_fraction() == pytest.approx(batching.padding_fraction(lengths, 512),
                                                  rel=1e-12)
  it = pipeline.make_iterator(cfg, "train", 4, seed=0, num_epochs=1, pad_to="bucket")
  batches = list(it)
  real = sum(int(b["lengths"].sum()) for b in batches)
  assert real == lengths.sum()
  assert it.padding_fraction() == pytest.approx(1 - real / sum(b["tokens"].size for b in batches),
                                                rel=1e-12)
  assert (batching.padding_fraction(lengths, 512, batching.default_boundaries(512))
          <= it.padding_fraction() < full.padding_fraction())


def test_padding_fraction_formula():
  lengths = np.array([10, 30, 64, 100])
  assert batching.padding_fraction(lengths, 64) == pytest.approx(1 - (10 + 30 + 64 + 64) / 256)
  assert batching.padding_fraction(lengths, 64, (16, 32, 64)) == pytest.approx(
      1 - (10 + 30 + 64 + 64) / (16 + 32 + 64 + 64))
