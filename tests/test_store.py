"""Tests of sedd_jax.data.store: opening a prepared store, and clear errors for bad ones."""

import shutil

import numpy as np
import pytest

from sedd_jax.data import store, tokenizers
from sedd_jax.data.store import StoreError


def test_open_len_getitem_lengths(faa_store):
  st = store.open_store(faa_store, "train")
  m = st.manifest
  assert len(st) == m["splits"]["train"]["sequences"] == st.split_manifest["sequences"]
  assert st.tracks == ("protein",)
  assert st.lengths.dtype == np.int32 and st.lengths.shape == (len(st),)
  assert all(st[i].size == st.lengths[i] for i in range(len(st)))
  assert st[0].dtype == np.uint8 and st[-1].size == st.lengths[-1]
  assert 30 <= st.lengths.min() and st.lengths.max() <= 1000
  assert tokenizers.ProteinTokenizer().decode(st[0]).isalpha()
  with pytest.raises(IndexError):
    st[len(st)]
  assert store.is_prepared(faa_store)


def test_missing_store_named(tmp_path):
  with pytest.raises(StoreError, match=f"prepared store {tmp_path / 'nope'} does not exist"):
    store.open_store(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(StoreError, match=r"empty/manifest\.json is missing"):
    store.open_store(tmp_path / "empty")
  assert not store.is_prepared(tmp_path / "empty")
  with pytest.raises(ValueError, match="split"):
    store.open_store(tmp_path, "dev")


def test_corrupt_store_named(faa_store, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(faa_store, bad)
  (bad / "valid" / "offsets.npy").unlink()
  with pytest.raises(StoreError, match=r"valid/offsets\.npy is missing"):
    store.open_store(bad, "valid")
  tokens = bad / "train" / "tokens.npy"
  tokens.write_bytes(tokens.read_bytes()[:-100])
  with pytest.raises(StoreError, match=r"train/tokens\.npy is corrupt"):
    store.open_store(bad, "train")
  (bad / "manifest.json").write_text("{")
  with pytest.raises(StoreError, match=r"bad/manifest\.json is corrupt"):
    store.open_store(bad, "test")


def test_is_store_means_a_folder_holding_a_store_manifest(faa_store, tmp_path):
  """What the trainer checks before it writes a run into a folder: a store's manifest.json
  (written by prepare: format_version and splits), complete or not; nothing else counts."""
  assert store.is_store(faa_store)
  partial = tmp_path / "partial"
  shutil.copytree(faa_store, partial)
  shutil.rmtree(partial / "valid")
  assert store.is_store(partial) and not store.is_prepared(partial)
  other = tmp_path / "other"
  other.mkdir()
  (other / "manifest.json").write_text('{"name": "not a store"}')
  (tmp_path / "empty").mkdir()
  (tmp_path / "file").write_text("x")
  assert not any(store.is_store(tmp_path / n) for n in ("other", "empty", "file", "absent"))
  assert store.store_files(store.open_store(faa_store).manifest) == (
      "manifest.json", "train/manifest.json", "train/tokens.npy", "train/offsets.npy",
      "valid/manifest.json", "valid/tokens.npy", "valid/offsets.npy", "test/manifest.json",
      "test/tokens.npy", "test/offsets.npy")
  assert sorted(str(p.relative_to(faa_store)) for p in faa_store.rglob("*") if p.is_file()) == (
      sorted(store.store_files(store.open_store(faa_store).manifest)))
