"""Tests of sedd_jax.data.prepare: the store end to end, atomic replacement, bad inputs, the CLI."""

import gzip
import json
import time

import numpy as np
import pytest

from helpers import FAA, PAIRS, ROOT, random_fasta
from sedd_jax.data import prepare, store, store_writer, tokenizers
from sedd_jax.data.fasta import DataError

TOK = tokenizers.ProteinTokenizer()


def _all_sequences(root):
  out = {}
  for split in store_writer.SPLITS:
    st = store.open_store(root, split)
    out[split] = [TOK.decode(st[i]) for i in range(len(st))]
  return out


def test_prepare_plain_fasta(tmp_path):
  seqs = random_fasta(tmp_path / "in.fasta")
  m = prepare.prepare(tmp_path / "in.fasta", tmp_path / "out", valid_fraction=0.1,
                      test_fraction=0.1)
  assert m["records_read"] == 400 and m["kept"] == 400 and m["skipped"] == {}
  assert m["source"]["files"][0]["sha256"] == store_writer.file_sha256(tmp_path / "in.fasta")
  assert m["filters"]["min_length"] == 30 and m["vocabulary"]["protein"]["mask_id"] == 32
  got = _all_sequences(tmp_path / "out")
  assert sorted(sum(got.values(), [])) == sorted(seqs)
  assert 10 < len(got["valid"]) < 80 and 10 < len(got["test"]) < 80
  assert sum(m["splits"][s]["sequences"] for s in store_writer.SPLITS) == 400
  tokens = np.load(tmp_path / "out" / "train" / "tokens.npy")  # the streamed .npy header is valid
  assert tokens.dtype == np.uint8 and tokens.size == m["splits"]["train"]["protein_tokens"]
  offsets = np.load(tmp_path / "out" / "train" / "offsets.npy")
  assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == tokens.size
  assert not list(tmp_path.glob(".out.tmp-*"))


def test_prepare_gzip_equals_plain(tmp_path):
  random_fasta(tmp_path / "in.fasta")
  (tmp_path / "in.fasta.gz").write_bytes(gzip.compress((tmp_path / "in.fasta").read_bytes()))
  prepare.prepare(tmp_path / "in.fasta", tmp_path / "a")
  prepare.prepare(tmp_path / "in.fasta.gz", tmp_path / "b")
  for split in store_writer.SPLITS:
    for f in ("tokens.npy", "offsets.npy"):
      assert (tmp_path / "a" / split / f).read_bytes() == (tmp_path / "b" / split / f).read_bytes()


def test_bad_input_truncated_gzip(tmp_path):
  random_fasta(tmp_path / "in.fasta", n=3000)
  data = gzip.compress((tmp_path / "in.fasta").read_bytes())
  (tmp_path / "cut.fasta.gz").write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match=r"cut\.fasta\.gz:\d+: truncated or corrupt gzip"):
    prepare.prepare(tmp_path / "cut.fasta.gz", tmp_path / "out")
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_bad_input_non_fasta(tmp_path):
  (tmp_path / "x.fasta").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
  with pytest.raises(DataError, match=r"x\.fasta:1: not a FASTA file"):
    prepare.prepare(tmp_path / "x.fasta", tmp_path / "out")


def test_bad_input_empty_file(tmp_path):
  (tmp_path / "e.fasta").write_text("")
  with pytest.raises(DataError, match=r"e\.fasta: empty file"):
    prepare.prepare(tmp_path / "e.fasta", tmp_path / "out")


def test_bad_input_digits(tmp_path):
  (tmp_path / "d.fasta").write_text(">a\n" + "MKV" * 20 + "\n>b\nMKV12KV\n")
  with pytest.raises(DataError, match=r"d\.fasta:4: invalid digit '1' at column 4 in sequence 'b'"):
    prepare.prepare(tmp_path / "d.fasta", tmp_path / "out")


def test_bad_input_unknown_letters_skip_counted(tmp_path):
  (tmp_path / "u.fasta").write_text(">a\n" + "MKV" * 20 + "\n>b\nMKJKV\n>c\nMK#\n")
  with pytest.raises(DataError, match=r"u\.fasta:4: invalid character 'J' at column 3"):
    prepare.prepare(tmp_path / "u.fasta", tmp_path / "out")
  m = prepare.prepare(tmp_path / "u.fasta", tmp_path / "out", on_error="skip", valid_fraction=0,
                      test_fraction=0)
  assert m["skipped"] == {"invalid_character": 2} and m["kept"] == 1
  assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"] == m["skipped"]


def test_bad_input_csv_without_columns(tmp_path):
  (tmp_path / "p.csv").write_text("ligand_id,affinity\nA,1\n")
  with pytest.raises(DataError, match=r"p\.csv:1: no protein sequence column found"):
    prepare.prepare(tmp_path / "p.csv", tmp_path / "out")


def test_bad_input_csv_protein_letters(tmp_path):
  (tmp_path / "p.csv").write_text("sequence,smiles\n" + "MKV" * 20 + ",CCO\nMK1V,CC\n")
  with pytest.raises(DataError, match=r"p\.csv:3"):
    prepare.prepare(tmp_path / "p.csv", tmp_path / "out")


def test_never_silently_empty(tmp_path):
  (tmp_path / "s.fasta").write_text(">a\nMKV\n>b\nMKVL\n")
  with pytest.raises(DataError, match=r"s\.fasta: no sequence kept out of 2 records.*too_short"):
    prepare.prepare(tmp_path / "s.fasta", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_existing_store_kept_on_failure_and_overwrite(tmp_path):
  random_fasta(tmp_path / "in.fasta")
  prepare.prepare(tmp_path / "in.fasta", tmp_path / "out")
  before = (tmp_path / "out" / "train" / "tokens.npy").read_bytes()
  stamp = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
  prepare.prepare(tmp_path / "in.fasta", tmp_path / "out")  # up to date: nothing to do
  assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == stamp
  with pytest.raises(FileExistsError, match="out already exists"):
    prepare.prepare(tmp_path / "in.fasta", tmp_path / "out", min_length=40)
  (tmp_path / "bad.fasta").write_text(">a\n" + "M" * 40 + "\n>b\nMK1\n")
  with pytest.raises(DataError):
    prepare.prepare(tmp_path / "bad.fasta", tmp_path / "out", overwrite=True)
  assert (tmp_path / "out" / "train" / "tokens.npy").read_bytes() == before
  m = prepare.prepare(tmp_path / "bad.fasta", tmp_path / "out", overwrite=True, on_error="skip",
                      valid_fraction=0, test_fraction=0)
  assert m["kept"] == 1 and len(store.open_store(tmp_path / "out")) == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fasta", "in.fasta", "out"]


def test_overwrite_never_touches_what_is_not_a_store(tmp_path):
  """--overwrite replaces a store only: a folder of the user's files or a plain file given as
  the output is refused with an error saying what it is, and left as it was."""
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  for overwrite in (False, True):
    with pytest.raises(FileExistsError, match="mine is a folder that is not a prepared store"):
      prepare.prepare(FAA, mine, overwrite=overwrite)
  assert prepare.main(["--input", str(FAA), "--output", str(mine), "--overwrite"]) == 1
  assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
  assert (mine / "notes.txt").read_text() == "keep me"
  plain = tmp_path / "plain.txt"
  plain.write_text("a file")
  for overwrite in (False, True):
    with pytest.raises(FileExistsError, match="plain.txt is an existing file, not a folder"):
      prepare.prepare(FAA, plain, overwrite=overwrite)
  assert plain.read_text() == "a file"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "plain.txt"]  # no leftovers
  empty = tmp_path / "empty"
  empty.mkdir()
  assert prepare.prepare(FAA, empty)["kept"] > 0 and store.is_prepared(empty)


def test_fixture_with_stop_codons(tmp_path):
  m = prepare.prepare(FAA, tmp_path / "out")
  assert m["records_read"] == 200 and m["skipped"] == {}
  assert m["kept"] + sum(m["filtered"].values()) == 200


def test_protein_ligand_csv(tmp_path):
  m = prepare.prepare(PAIRS, tmp_path / "out", max_length=5000, valid_fraction=0.2,
                      test_fraction=0.2)
  assert m["kind"] == "protein_ligand" and m["tracks"] == ["protein", "ligand"]
  assert m["kept"] == 60
  st = store.open_store(tmp_path / "out", "train")
  smi = st.smiles_tokenizer()
  assert (tmp_path / "out" / "smiles_vocab.json").exists()
  import csv
  rows = list(csv.DictReader(PAIRS.open()))
  pairs = {(r["aa_sequence"], r["smiles"]) for r in rows}
  got = set()
  proteins_by_split = {}
  for split in store_writer.SPLITS:
    st = store.open_store(tmp_path / "out", split)
    proteins_by_split[split] = {TOK.decode(st[i]) for i in range(len(st))}
    got |= {(TOK.decode(st[i]), smi.decode(st.get(i, "ligand"))) for i in range(len(st))}
  assert got == pairs  # SMILES round-trip through the saved vocabulary
  assert not proteins_by_split["train"] & (proteins_by_split["valid"] | proteins_by_split["test"])


def test_peers_layout_keeps_splits(tmp_path):
  seqs = random_fasta(tmp_path / "consensus.fasta", n=10)
  (tmp_path / "splits.json").write_text(json.dumps({"train": [0, 1, 2, 3, 4, 5], "valid": [6, 7],
                                                    "test": [8]}))
  m = prepare.prepare(tmp_path, tmp_path / "out")
  assert m["source"]["format"] == "peers" and m["filtered"]["not_in_splits"] == 1
  got = _all_sequences(tmp_path / "out")
  assert got["valid"] == seqs[6:8] and got["test"] == [seqs[8]] and got["train"] == seqs[:6]


def test_cli(tmp_path):
  rc = prepare.main(["--input", str(FAA), "--output", str(tmp_path / "out"), "--min-length", "50",
                     "--valid-fraction", "0.05"])
  assert rc == 0
  m = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert m["filters"]["min_length"] == 50 and m["filters"]["valid_fraction"] == 0.05
  args = ["--input", str(FAA), "--output", str(tmp_path / "out"), "--min-length", "50"]
  assert prepare.main(args + ["--valid-fraction", "0.05"]) == 0  # up to date
  assert prepare.main(args) == 1  # exists, other settings
  assert prepare.main(args + ["--overwrite"]) == 0


def test_bundled_files_exist_and_prepare(tmp_path):
  uniprot = ROOT / "data" / "uniprot_mmseqs2_example.fasta.gz"
  pairs = ROOT / "data" / "protein_ligand_pairs.csv.gz"
  assert uniprot.exists() and pairs.exists() and (ROOT / "data" / "README.md").exists()
  assert uniprot.stat().st_size + pairs.stat().st_size < 8e6
  t0 = time.perf_counter()
  m = prepare.prepare(uniprot, tmp_path / "uniprot")
  assert time.perf_counter() - t0 < 60
  assert m["records_read"] == 18801 and m["filtered"]["duplicate"] == 0 and m["skipped"] == {}
  assert m["kept"] > 17000
  m = prepare.prepare(pairs, tmp_path / "pairs", max_length=5000)
  assert m["records_read"] == 5000 and m["kept"] > 4900
