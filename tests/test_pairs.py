"""Tests of sedd_jax.data.pairs: the protein-ligand CSV/TSV reader and its file:line errors."""

import gzip

import pytest

from helpers import PAIRS, write_text
from sedd_jax.data import pairs
from sedd_jax.data.fasta import DataError, Skips


def test_read_pairs_detects_columns():
  recs = list(pairs.read_pairs(PAIRS))
  assert len(recs) == 60
  assert recs[0].smiles and recs[0].protein.startswith(b"M") and recs[0].line == 2


def test_read_pairs_tsv_explicit_columns_and_gzip(tmp_path):
  text = "id\tTarget\tLig\nx\tMKVL\tCCO\ny\tMKKK\tc1ccccc1\n"
  p = tmp_path / "p.tsv.gz"
  p.write_bytes(gzip.compress(text.encode()))
  recs = list(pairs.read_pairs(p, protein_column="target", smiles_column="Lig", name_column="id"))
  assert [(r.protein, r.smiles, r.name, r.line) for r in recs] == [
      (b"MKVL", "CCO", "x", 2), (b"MKKK", "c1ccccc1", "y", 3)]


@pytest.mark.parametrize("header,kwargs,message", [
    ("name,affinity", {}, "no protein sequence column found; the header has ['name', 'affinity']"),
    ("sequence,affinity", {}, "no SMILES column found"),
    ("sequence,smiles", {"protein_column": "prot"}, "no protein sequence column 'prot'"),
])
def test_csv_without_needed_columns(tmp_path, header, kwargs, message):
  p = write_text(tmp_path / "p.csv", f"{header}\nMKV,CCO\n")
  with pytest.raises(DataError) as e:
    list(pairs.read_pairs(p, **kwargs))
  assert str(e.value).startswith(f"{p}:1: {message}") and e.value.line == 1


def test_csv_short_row_and_empty_field(tmp_path):
  p = write_text(tmp_path / "p.csv", "sequence,smiles\nMKV,CCO\nMKV\n,CC\n")
  with pytest.raises(DataError, match=r"p\.csv:3: row has 1 fields, needs 2"):
    list(pairs.read_pairs(p))
  skips = Skips("skip")
  assert len(list(pairs.read_pairs(p, skips=skips))) == 1
  assert skips.summary() == {"empty_field": 1, "short_row": 1}
  p = write_text(tmp_path / "empty.csv", "")
  with pytest.raises(DataError, match=r"empty\.csv: empty file"):
    list(pairs.read_pairs(p))


def test_a_utf8_byte_order_mark_before_the_header_is_stripped(tmp_path):
  p = tmp_path / "bom.csv"
  p.write_bytes(b"\xef\xbb\xbfaa_sequence,smiles\nMKVL,CCO\n")
  assert [(r.protein, r.smiles, r.line) for r in pairs.read_pairs(p)] == [(b"MKVL", "CCO", 2)]
