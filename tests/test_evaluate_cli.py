"""python -m sedd_jax.evaluate: outputs, determinism, bad input, and (slow, not timed) a briefly
trained tiny model whose ELBO beats the unigram baseline on held-out data."""

import json
import logging
import math

import numpy as np
import pytest

from sedd_jax import evaluate as evaluate_cli
from sedd_jax.data import pipeline

from test_sample_cli import save_checkpoint  # noqa: E402  (tests/ is on sys.path)
from test_sample_cli import tiny_config  # noqa: E402
from test_sample_cli import uniref50  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("evaluate_cli")
  cfg = tiny_config(tmp)
  pipeline.ensure_prepared(cfg)
  return save_checkpoint(tmp / "run", cfg)


def test_fasta_and_split(workdir, tmp_path, capsys):
  fa = tmp_path / "e.fasta"
  fa.write_text(">a\nMKVLAAGGSTEEKK\n>b\nMKVLSTTTAAGW\n>c\n" + "A" * 60 + "\n")
  args = ["--workdir", str(workdir), "--fasta", str(fa), "--num-samples", "4",
          "--baseline-fasta", str(fa), "--batch-size", "2"]
  assert evaluate_cli.main(args + ["--out", str(tmp_path / "a.json")]) == 0
  assert evaluate_cli.main(args + ["--out", str(tmp_path / "b.json")]) == 0
  a = json.loads((tmp_path / "a.json").read_text())
  b = json.loads((tmp_path / "b.json").read_text())
  assert a["nelbo_per_token"] == b["nelbo_per_token"]  # same seed, same estimate
  assert a["num_sequences"] == 3 and a["cropped_sequences"] == 1
  assert a["num_tokens"] == 14 + 12 + 48  # the long one cropped to the model length
  if a["nelbo_per_token"] < 700:
    assert a["perplexity"] == pytest.approx(math.exp(a["nelbo_per_token"]))
  assert a["se_per_token"] > 0 and a["unigram_nll_per_token"] > 0
  assert [s["name"] for s in a["per_sequence"]] == ["a", "b", "c"]
  assert "nelbo/token" in capsys.readouterr().out
  out = tmp_path / "s.json"
  assert evaluate_cli.main(["--workdir", str(workdir), "--split", "test", "--num-samples", "4",
                            "--antithetic", "--max-sequences", "4", "--out", str(out)]) == 0
  s = json.loads(out.read_text())
  assert s["t_sampling"] == "antithetic" and 0 < s["num_sequences"] <= 4
  assert s["se_per_token"] is not None
  assert s["unigram_nll_per_token"] is not None  # from the prepared training split


def test_bad_input(workdir, tmp_path, caplog):
  fa = tmp_path / "bad.fasta"
  fa.write_text(">a\nMKV#LA\n")
  cases = [
      (["--fasta", str(fa)], "bad.fasta:2"),
      (["--fasta", str(tmp_path / "none.fasta")], "does not exist"),
      (["--split", "valid", "--antithetic", "--num-samples", "3"], "even"),
  ]
  for extra, match in cases:
    caplog.clear()
    with caplog.at_level(logging.ERROR):
      assert evaluate_cli.main(["--workdir", str(workdir), "--out", str(tmp_path / "o.json")]
                               + extra) == 2
    assert match in caplog.text, (extra, caplog.text)
  bad = save_checkpoint(tmp_path / "bad", tiny_config(tmp_path),
                        stored_cfg=tiny_config(tmp_path, hidden=64))
  caplog.clear()
  with caplog.at_level(logging.ERROR):
    assert evaluate_cli.main(["--workdir", str(bad), "--split", "valid",
                              "--out", str(tmp_path / "o.json")]) == 2
  assert "another model shape" in caplog.text


@pytest.mark.slow
def test_trained_tiny_model_beats_unigram(tmp_path):
  """Not a timed test (~1 min on 2 CPU cores): 150 training steps on structured sequences
  (shifted repeats of three 6-residue motifs), then the held-out ELBO against the unigram
  baseline of the training split."""
  from sedd_jax import train as train_lib

  rng = np.random.default_rng(0)
  motifs = ["MKVLAG", "WYHEDR", "PQSTNC"]
  lines = []
  for i in range(600):
    m, n, off = motifs[rng.integers(3)], int(rng.integers(30, 48)), int(rng.integers(6))
    lines.append(f">s{i}\n{(m * 10)[off:off + n]}\n")
  (tmp_path / "d.fasta").write_text("".join(lines))
  cfg = uniref50.get_config("tiny")
  cfg.model.update(hidden_size=32, n_heads=2, n_blocks=1, cond_dim=16, length=32)
  cfg.data.update(fasta=str(tmp_path / "d.fasta"), prepared=str(tmp_path / "prep"),
                  min_length=30, max_length=64, valid_fraction=0.1, test_fraction=0.1)
  cfg.training.update(batch_size=16, steps=150, log_every=50, eval_every=0, sample_every=0,
                      ckpt_every=150, keep=1)
  cfg.optim.update(lr=3e-3, warmup=10)
  cfg.wandb.mode = "disabled"
  assert train_lib.train(cfg, tmp_path / "run").code == 0
  out = tmp_path / "eval.json"
  assert evaluate_cli.main(["--workdir", str(tmp_path / "run"), "--split", "test",
                            "--num-samples", "16", "--batch-size", "32", "--out", str(out)]) == 0
  res = json.loads(out.read_text())
  logging.getLogger(__name__).info("trained tiny model: %s", res)
  assert res["nelbo_per_token"] + 4 * res["se_per_token"] < res["unigram_nll_per_token"], res


def test_short_peptides_are_packed():
  rng = np.random.default_rng(0)
  seqs = [rng.integers(4, 29, n).astype(np.int32) for n in rng.integers(8, 40, 50)]
  rows = evaluate_cli.rows_of(seqs, 128, pack=True)
  full = evaluate_cli.rows_of(seqs, 128, pack=False)
  idx = rows["index"][rows["index"] >= 0]
  assert sorted(idx.tolist()) == list(range(50))  # every sequence once
  for r, row in enumerate(rows["index"]):
    for s, i in enumerate(row[row >= 0], 1):
      np.testing.assert_array_equal(rows["tokens"][r][rows["segment_ids"][r] == s], seqs[i])

  def padding(b):
    return 1 - b["lengths"].sum() / b["tokens"].size

  assert padding(rows) < 0.1 < 0.3 < padding(full)
  assert len(rows["tokens"]) < len(seqs) // 5
