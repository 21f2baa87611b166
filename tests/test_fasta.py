"""Tests of sedd_jax.data.fasta: streaming FASTA readers and their file:line errors."""

import gzip
import json

import pytest

from helpers import FAA, write_text
from sedd_jax.data import fasta
from sedd_jax.data.fasta import DataError, Skips


def test_reads_fixture_with_stop_codons():
  recs = list(fasta.read_fasta(FAA))
  assert len(recs) == 200
  assert recs[0].name == "938293.PRJEB85.HG003688_1" and recs[0].line == 1
  assert recs[0].sequence.startswith(b"MNINELLKDK") and recs[0].sequence.endswith(b"*")
  assert [r.index for r in recs] == list(range(200))


def test_multiline_blank_lines_and_gzip_equal(tmp_path):
  text = ">a desc\nMKV\nLLA\n\n>b\r\nmkv*\r\n"
  plain = write_text(tmp_path / "x.fasta", text)
  gz = tmp_path / "x.fa.gz"
  gz.write_bytes(gzip.compress(text.encode()))
  for p in (plain, gz):
    recs = list(fasta.read_fasta(p))
    assert [(r.name, r.description, r.sequence, r.line) for r in recs] == [
        ("a", "a desc", b"MKVLLA", 1), ("b", "b", b"mkv*", 5)]


def test_parse_uniref_and_uniprot_headers():
  h = fasta.parse_header("UniRef50_Q6GZX4 Putative transcription factor 001R n=2 "
                         "Tax=Frog virus 3 TaxID=10493 RepID=001R_FRG3G")
  assert h == {"id": "UniRef50_Q6GZX4", "title": "Putative transcription factor 001R", "n": 2,
               "tax": "Frog virus 3", "taxid": "10493", "repid": "001R_FRG3G"}
  h = fasta.parse_header("tr|W0FSK4|W0FSK4_9FLAV Genome polyprotein OS=Dengue virus 3 PE=4 SV=1")
  assert h["id"] == "W0FSK4" and h["entry"] == "W0FSK4_9FLAV" and h["os"] == "Dengue virus 3"
  assert fasta.parse_header("seq1")["id"] == "seq1"


def test_truncated_gzip_names_file_and_line(tmp_path):
  data = gzip.compress(("".join(f">s{i}\n{'MKV' * 40}\n" for i in range(2000))).encode())
  p = tmp_path / "cut.fasta.gz"
  p.write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match=r"cut\.fasta\.gz:\d+: truncated or corrupt gzip") as e:
    list(fasta.read_fasta(p))
  assert e.value.line > 1


def test_non_fasta_names_file_and_line(tmp_path):
  p = write_text(tmp_path / "notes.txt", "\nhello world\n>x\nMKV\n")
  with pytest.raises(DataError, match=r"notes\.txt:2: not a FASTA file"):
    list(fasta.read_fasta(p))


def test_empty_file(tmp_path):
  p = write_text(tmp_path / "empty.fasta", "\n\n")
  with pytest.raises(DataError, match=r"empty\.fasta: empty file"):
    list(fasta.read_fasta(p))


@pytest.mark.parametrize("bad,what", [("MK3V", "digit '3'"), ("MKJV", "character 'J'")])
def test_bad_sequence_line_named(tmp_path, bad, what):
  p = write_text(tmp_path / "bad.fasta", f">a\nMKV\n>b\nMKV\n{bad}\n>c\nMKV\n")
  with pytest.raises(DataError) as e:
    list(fasta.read_fasta(p))
  assert f"bad.fasta:5: invalid {what} at column 3 in sequence 'b'" in str(e.value)
  skips = Skips("skip")
  assert [r.name for r in fasta.read_fasta(p, skips)] == ["a", "c"]
  assert skips.summary() == {"invalid_character": 1}


def test_inner_stop_and_empty_sequence(tmp_path):
  p = write_text(tmp_path / "s.fasta", ">a\nMKV\nM*K\n>b\n>c\nMK\n")
  with pytest.raises(DataError, match=r"s\.fasta:3: stop '\*' inside sequence 'a'"):
    list(fasta.read_fasta(p))
  p = write_text(tmp_path / "e.fasta", ">a\nMKV\n>b\n>c\nMK\n")
  with pytest.raises(DataError, match=r"e\.fasta:3: record 'b' has an empty sequence"):
    list(fasta.read_fasta(p))
  skips = Skips("skip")
  assert [r.name for r in fasta.read_fasta(p, skips)] == ["a", "c"]
  assert skips.summary() == {"empty_sequence": 1}


def test_missing_file_and_bad_policy(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.fasta"):
    list(fasta.read_fasta(tmp_path / "nope.fasta"))
  with pytest.raises(ValueError, match="on_error"):
    Skips("ignore")


def test_peers_layout(tmp_path):
  write_text(tmp_path / "consensus.fasta", ">u0\nMKV\n>u1\nMKL\n>u2\nMKA\n>u3\nMKG\n")
  (tmp_path / "splits.json").write_text(json.dumps({"train": [0, 3], "valid": [1], "rtest": [2]}))
  path, split_of = fasta.peers_layout(tmp_path)
  assert path.name == "consensus.fasta"
  assert [split_of(i) for i in range(5)] == ["train", "valid", None, "train", None]
  (tmp_path / "splits.json").write_text("{\"train\": [0,\n")
  with pytest.raises(DataError, match=r"splits\.json:\d+: malformed"):
    fasta.peers_layout(tmp_path)


def test_detect_format(tmp_path):
  assert fasta.detect_format("a/b.fasta.gz") == "fasta"
  assert fasta.detect_format("a/b.csv.gz") == "csv"
  assert fasta.detect_format("b.TSV") == "csv"
  assert fasta.detect_format(tmp_path) == "peers"


def test_a_utf8_byte_order_mark_is_stripped(tmp_path):
  text = ">a desc\nMKV\n>b\nMKL\n"
  plain = tmp_path / "bom.fasta"
  plain.write_bytes(b"\xef\xbb\xbf" + text.encode())
  gz = tmp_path / "bom.fasta.gz"
  gz.write_bytes(gzip.compress(plain.read_bytes()))
  for p in (plain, gz):
    assert [(r.name, r.description, r.sequence, r.line) for r in fasta.read_fasta(p)] == [
        ("a", "a desc", b"MKV", 1), ("b", "b", b"MKL", 3)]


def test_a_folder_must_hold_the_peers_layout(tmp_path):
  """A folder input is the peers' layout; any other folder is told what it must hold and what
  it holds."""
  write_text(tmp_path / "a.fasta", ">u0\nMKV\n")
  write_text(tmp_path / "b.fa", ">u1\nMKV\n")
  with pytest.raises(DataError) as e:
    fasta.peers_layout(tmp_path)
  assert str(e.value) == (
      f"{tmp_path}: a folder input must hold the peers' UniRef50 layout, consensus.fasta (or "
      "consensus.fasta.gz) and splits.json; this one holds a.fasta, b.fa (give one FASTA file "
      "as --input / data.fasta; several: cat them into one)")
  write_text(tmp_path / "consensus.fasta", ">u0\nMKV\n")
  with pytest.raises(DataError, match=r": a folder input must hold the peers' UniRef50 layout, "
                     r"consensus.fasta \(or consensus.fasta.gz\) and splits.json; splits.json "
                     r"is missing$"):
    fasta.peers_layout(tmp_path)
