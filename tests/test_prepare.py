"""Tests of sedd_jax.data.prepare: the store end to end, atomic replacement, bad inputs, the CLI."""

import errno
import gzip
import json
import os
import pathlib
import re
import shutil
import time

import numpy as np
import pytest

from helpers import FAA, PAIRS, ROOT, cli_fails, random_fasta
from sedd_jax.data import prepare, store, store_writer, tokenizers
from sedd_jax.data.fasta import DataError
from sedd_jax.data.store import StoreError

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
    with pytest.raises(StoreError, match="mine is a folder that is not a prepared store"):
      prepare.prepare(FAA, mine, overwrite=overwrite)
  assert prepare.main(["--input", str(FAA), "--output", str(mine), "--overwrite"]) == 2
  assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
  assert (mine / "notes.txt").read_text() == "keep me"
  plain = tmp_path / "plain.txt"
  plain.write_text("a file")
  for overwrite in (False, True):
    with pytest.raises(StoreError, match="plain.txt is an existing file, not a folder"):
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
  assert prepare.main(args) == 2  # exists, other settings
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


def _tree(root):
  """{relative path: bytes} of every file under `root` (what a refused command must keep)."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


def test_overwrite_refuses_a_store_folder_that_holds_anything_else(tmp_path, caplog):
  """--overwrite replaces a store only when its folder holds nothing but the store's files: a
  user's NOTES.txt or a run's checkpoints/ beside it (or a file inside a split) are named in a
  one-line refusal and nothing is touched."""
  out = tmp_path / "out"
  prepare.prepare(FAA, out)
  (out / "NOTES.txt").write_text("mine")
  (out / "checkpoints" / "5").mkdir(parents=True)
  (out / "checkpoints" / "5" / "params").write_text("weights")
  (out / "train" / "extra.npy").write_text("x")
  before = _tree(out)
  with pytest.raises(StoreError, match=r"out is a store that also holds what prepare did not "
                     r"write \(NOTES.txt, checkpoints/, train/extra.npy\)"):
    prepare.prepare(FAA, out, overwrite=True, min_length=40)
  cli_fails(prepare.main, ["--input", str(FAA), "--output", str(out), "--overwrite"], caplog,
            "also holds what prepare did not write (NOTES.txt, checkpoints/, train/extra.npy)")
  assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  for extra in ("NOTES.txt", "checkpoints", "train/extra.npy"):
    shutil.rmtree(out / extra) if (out / extra).is_dir() else (out / extra).unlink()
  assert prepare.prepare(FAA, out, overwrite=True, min_length=40)["filters"]["min_length"] == 40


def test_a_file_written_into_the_store_during_prepare_is_kept(tmp_path, monkeypatch):
  """The check is repeated just before the old store is replaced: a file that appeared in the
  folder while prepare ran (a run started there) stops the replacement; the old store stays."""
  out = tmp_path / "out"
  prepare.prepare(FAA, out)
  before = _tree(out)
  write_store = store_writer.write_store

  def and_a_user_file(*args, **kwargs):
    (out / "metrics.jsonl").write_text("{}")
    return write_store(*args, **kwargs)

  monkeypatch.setattr(store_writer, "write_store", and_a_user_file)
  with pytest.raises(StoreError, match=r"also holds what prepare did not write \(metrics.jsonl\)"):
    prepare.prepare(FAA, out, overwrite=True, min_length=40)
  assert _tree(out) == {**before, "metrics.jsonl": b"{}"}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_is_never_its_own_input(tmp_path, caplog):
  """A store is never written over (or around) its source: refused in one line before any
  work, the source kept, even with --overwrite."""
  out = tmp_path / "out"
  prepare.prepare(FAA, out)
  shutil.copy(FAA, out / "in.faa")
  before = _tree(out)
  with pytest.raises(StoreError, match=rf"^--output {out} is \(or holds\) the input "
                     rf"{out / 'in.faa'}: a store is never written over its source"):
    prepare.prepare(out / "in.faa", out, overwrite=True)
  cli_fails(prepare.main, ["--input", str(out / "in.faa"), "--output", str(out), "--overwrite"],
            caplog, f"--output {out} is (or holds) the input {out / 'in.faa'}")
  src = tmp_path / "in.faa"
  shutil.copy(FAA, src)
  cli_fails(prepare.main, ["--input", str(src), "--output", str(src), "--overwrite"], caplog,
            f"--output {src} is (or holds) the input {src}")
  assert _tree(out) == before and src.read_bytes() == FAA.read_bytes()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in.faa", "out"]


def test_disk_full_is_one_line_and_leaves_no_temporary_folder(tmp_path, monkeypatch, caplog):
  write = store_writer.NpyWriter.write

  def until_full(self, data):
    write(self, data)
    if self.nbytes > 3000:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(store_writer.NpyWriter, "write", until_full)
  out = tmp_path / "out"
  cli_fails(prepare.main, ["--input", str(FAA), "--output", str(out)], caplog,
            f"disk full: no space left on the device of {out} while writing the store (")
  (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
  assert "\n" not in record.getMessage() and record.exc_info is None
  assert re.search(r"\(\d+\.\d MB written before it filled, \d+\.\d MB free now\)",
                   record.getMessage()), record.getMessage()
  assert list(tmp_path.iterdir()) == []  # neither the store nor its temporary folder


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path):
  """What a `kill -9` leaves: the next prepare of the same output removes the temporary (and
  set-aside) folders of processes of this host that are gone; those of a live process (another
  prepare in progress) and of other hosts (a shared file system) are kept."""
  out = tmp_path / "out"
  dead = int(pathlib.Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process has it
  stale = [prepare.scratch_folder(out, "tmp", dead), prepare.scratch_folder(out, "old", dead),
           tmp_path / f".out.tmp-{dead}-0badf00d"]  # the name without a host (older versions)
  kept = [prepare.scratch_folder(out, "tmp", os.getpid()), tmp_path /
          f".out.tmp-otherhost-{dead}-0badf00d", tmp_path / f".other.tmp-{dead}-0badf00d"]
  for folder in stale + kept:
    folder.mkdir()
    (folder / "tokens.npy").write_bytes(b"x" * 100)
  assert len({p.name for p in stale + kept}) == 6 and all(f"-{dead}-" in p.name for p in stale)
  prepare.prepare(FAA, out)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + [p.name for p in kept])


def test_pairs_with_invalid_smiles_are_bad_records(tmp_path):
  """A SMILES that fails the grammar check (unbalanced branch, unclosed ring) is bad input:
  an error naming the file and line, or counted and dropped with --on-error skip."""
  prot = "MKVLAGTSEP" * 4
  p = tmp_path / "p.csv"
  p.write_text(f"sequence,smiles\n{prot},CCO\n{prot}K,C1CC((N\n{prot}R,c1ccc\n{prot}A,CC(=O)O\n")
  with pytest.raises(DataError, match=r"p\.csv:3: invalid SMILES 'C1CC\(\(N'"):
    prepare.prepare(p, tmp_path / "out")
  m = prepare.prepare(p, tmp_path / "out", on_error="skip", valid_fraction=0, test_fraction=0)
  assert m["skipped"] == {"invalid_smiles": 2} and m["kept"] == 2
  st = store.open_store(tmp_path / "out")
  smi = st.smiles_tokenizer()
  assert sorted(smi.decode(st.get(i, "ligand")) for i in range(len(st))) == ["CC(=O)O", "CCO"]


def test_a_folder_input_must_be_the_peers_layout(tmp_path, caplog):
  (tmp_path / "in").mkdir()
  random_fasta(tmp_path / "in" / "a.fasta", n=3)
  random_fasta(tmp_path / "in" / "b.fasta", n=3)
  cli_fails(prepare.main, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
            caplog, f"{tmp_path / 'in'}: a folder input must hold the peers' UniRef50 layout, "
            "consensus.fasta (or consensus.fasta.gz) and splits.json; this one holds a.fasta, "
            "b.fasta (give one FASTA file as --input")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
