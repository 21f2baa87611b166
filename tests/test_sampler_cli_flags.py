"""The sample/evaluate flags of issue 18: --predictor first_hitting, --draw, --remask, and the
masked pseudo-perplexity and bits per residue of evaluate (a tiny random checkpoint)."""

import functools
import json
import math

import pytest

from helpers import cli_fails, read_records
from sedd_jax import evaluate as evaluate_cli
from sedd_jax import sample as sample_cli
from sedd_jax.data import tokenizers

STANDARD = set(tokenizers.STANDARD_RESIDUES)
_fails = functools.partial(cli_fails, sample_cli.main)


def test_first_hitting_and_remask_flags(workdir, tmp_path, caplog):
  base = ["--workdir", str(workdir), "--num", "3", "--length", "12", "--batch-size", "3"]
  assert sample_cli.main(base + ["--predictor", "first_hitting", "--draw", "reference",
                                 "--remask", "0.5", "--prefix", "MK",
                                 "--out", str(tmp_path / "f.fasta")]) == 0
  recs = read_records(tmp_path / "f.fasta")
  assert len(recs) == 3
  for head, seq in recs:
    assert len(seq) == 12 and seq.startswith("MK") and set(seq) <= STANDARD
    assert "predictor=first_hitting" in head and "draw=reference" in head
  assert sample_cli.main(base + ["--steps", "4", "--remask", "0.2",
                                 "--out", str(tmp_path / "r.fasta")]) == 0
  assert all("remask=0.2" in h for h, _ in read_records(tmp_path / "r.fasta"))
  out = ["--out", str(tmp_path / "x.fasta")]
  _fails(base + out + ["--predictor", "euler", "--remask", "0.1"], caplog,
         "--remask needs --predictor analytic or first_hitting")
  _fails(base + out + ["--remask", "1.5"], caplog, "--remask must be in [0, 1]")
  _fails(base + out + ["--predictor", "first_hitting", "--cached"], caplog,
         "first_hitting needs the absorbing graph and no --cached")


def test_evaluate_pseudo_perplexity_and_bits(workdir, tmp_path, capsys, caplog):
  fa = tmp_path / "e.fasta"
  fa.write_text(">a\nMKVLAAGGSTEEKK\n>b\nMKVLSTTTAAGW\n>c\nMSTAKVLLQEGHWWRRT\n")
  path = tmp_path / "e.json"
  assert evaluate_cli.main(["--workdir", str(workdir), "--fasta", str(fa), "--num-samples", "2",
                            "--pppl-samples", "8", "--batch-size", "2", "--baseline-fasta",
                            str(fa), "--out", str(path)]) == 0
  r = json.loads(path.read_text())
  assert r["bits_per_residue"] == pytest.approx(r["nelbo_per_token"] / math.log(2))
  assert r["unigram_bits_per_residue"] == pytest.approx(r["unigram_nll_per_token"] / math.log(2))
  p = r["pseudo_perplexity"]
  assert p["mask_frac"] == 0.15
  # 8 draws of 43 tokens at 15%: 51.6 masked tokens expected (sd 6.6).
  assert 25 < p["masked_tokens"] < 80
  assert p["pseudo_perplexity"] == pytest.approx(math.exp(p["masked_nll_per_token"]))
  assert p["masked_bits_per_residue"] == pytest.approx(p["masked_nll_per_token"] / math.log(2))
  assert p["masked_nll_per_token"] > 0
  out = capsys.readouterr().out
  assert "15%-masked pseudo-perplexity" in out and "bits/residue" in out
  _fails_eval = ["--workdir", str(workdir), "--fasta", str(fa), "--out", str(path)]
  assert evaluate_cli.main(_fails_eval + ["--mask-frac", "1.0"]) == 2
  assert "--mask-frac must be in (0, 1)" in caplog.text
