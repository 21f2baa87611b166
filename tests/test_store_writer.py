"""Tests of sedd_jax.data.store_writer: streamed .npy files, tracks, the hash split, filters."""

import hashlib

import numpy as np
import pytest

from helpers import random_fasta
from sedd_jax.data import store_writer, tokenizers

TOK = tokenizers.ProteinTokenizer()
OPTS = store_writer.PrepareOptions(valid_fraction=0.1, test_fraction=0.1)


def _write(tmp_path, name, fasta, opts=OPTS):
  """write_store of the FASTA file `fasta` into a new folder; (manifest, {split: [sequences]})."""
  folder = tmp_path / name
  folder.mkdir()
  m = store_writer.write_store(fasta, folder, "fasta", opts)
  out = {}
  for split in store_writer.SPLITS:
    tokens, offsets = (np.load(folder / split / f) for f in ("tokens.npy", "offsets.npy"))
    out[split] = [TOK.decode(tokens[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
  return m, out


def test_npy_writer_streams_bytes_and_arrays_into_a_valid_npy(tmp_path):
  w = store_writer.NpyWriter(tmp_path / "x.npy", np.int64)
  w.write(np.arange(5))
  w.write(np.array([7, 8], np.int32))  # converted to the file's dtype
  w.write(np.array([9], np.int64).tobytes())
  assert w.close() == 8
  np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), [0, 1, 2, 3, 4, 7, 8, 9])
  empty = store_writer.NpyWriter(tmp_path / "e.npy", np.uint16)
  assert empty.close() == 0
  loaded = np.load(tmp_path / "e.npy")
  assert loaded.shape == (0,) and loaded.dtype == np.uint16


def test_track_writer_offsets_and_statistics(tmp_path):
  """70,000 sequences (past the 65,536 offsets kept in memory): offsets are the running sums."""
  w = store_writer.TrackWriter(tmp_path, "ligand_", np.uint8)
  lengths = np.random.default_rng(0).integers(1, 6, 70_000)
  for n in lengths:
    w.add(bytes([5]) * int(n))
  stats = w.close()
  assert stats == {"sequences": 70_000, "tokens": int(lengths.sum()), "min_length": 1,
                   "max_length": 5, "mean_length": lengths.sum() / 70_000}
  offsets = np.load(tmp_path / "ligand_offsets.npy")
  np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(lengths)]))
  assert np.load(tmp_path / "ligand_tokens.npy").size == lengths.sum()


def test_splitter_thresholds_and_the_keyed_digest():
  s = store_writer.Splitter(valid_fraction=0.1, test_fraction=0.2)
  t_test, t_valid = int(0.2 * 2**64), int((0.2 + 0.1) * 2**64)  # u < f_test + f_valid
  assert [s(0), s(t_test - 1), s(t_test), s(t_valid - 1), s(t_valid), s(2**64 - 1)] == [
      "test", "test", "valid", "valid", "train", "train"]
  want = hashlib.blake2b(b"\x05\x06", digest_size=8, key=b"salt").digest()
  assert store_writer.digest(b"\x05\x06", b"salt") == int.from_bytes(want, "little")
  assert store_writer.digest(b"\x05\x06", b"") != store_writer.digest(b"\x05\x06", b"salt")
  shares = np.mean([[s(store_writer.digest(i.to_bytes(4, "little"), b"")) == k
                     for k in ("test", "valid")] for i in range(20_000)], axis=0)
  np.testing.assert_allclose(shares, [0.2, 0.1], atol=0.01)


def test_options_are_checked_naming_the_setting():
  for bad, match in (({"min_length": 0}, "min_length"), ({"min_standard_fraction": 2.0},
                     "min_standard_fraction"), ({"valid_fraction": 0.5, "test_fraction": 0.5},
                     "valid_fraction, test_fraction"), ({"on_error": "ignore"}, "on_error")):
    with pytest.raises(ValueError, match=match):
      store_writer.PrepareOptions(**bad).validate()


def test_split_deterministic_disjoint_and_order_independent(tmp_path):
  seqs = random_fasta(tmp_path / "in.fasta", n=600, lines=False)
  rev = "".join(f">r{i}\n{s}\n" for i, s in enumerate(reversed(seqs)))
  (tmp_path / "rev.fasta").write_text(rev)
  _, a = _write(tmp_path, "a", tmp_path / "in.fasta")
  _, b = _write(tmp_path, "b", tmp_path / "rev.fasta")
  for split in store_writer.SPLITS:
    assert set(a[split]) == set(b[split])
  assert not set(a["train"]) & set(a["valid"]) and not set(a["train"]) & set(a["test"])
  assert not set(a["valid"]) & set(a["test"])
  assert sorted(sum(a.values(), [])) == sorted(seqs)
  _, c = _write(tmp_path, "c", tmp_path / "in.fasta", store_writer.PrepareOptions(
      valid_fraction=0.1, test_fraction=0.1, split_salt="other"))
  assert set(c["valid"]) != set(a["valid"])


def test_filters_and_dedup(tmp_path):
  std = "MKVLAGTSEP" * 5  # 50 residues
  text = (f">dup1\n{std}\n>dup2\n{std.lower()}\n>short\nMKV\n>long\n{'A' * 1200}\n"
          f">rare\n{'X' * 10 + std[:40]}\n>ok_rare\n{'XBUZO' + std[:45]}*\n")
  (tmp_path / "f.fasta").write_text(text)
  m, got = _write(tmp_path, "out", tmp_path / "f.fasta", store_writer.PrepareOptions(
      valid_fraction=0, test_fraction=0, min_standard_fraction=0.85))
  assert m["filtered"] == {"too_short": 1, "too_long": 1, "low_standard_fraction": 1,
                           "duplicate": 1}
  assert (m["records_read"], m["kept"]) == (6, 2)
  assert sorted(got["train"]) == sorted([std, "XBUZO" + std[:45]])
