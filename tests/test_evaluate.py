"""python -m sedd_jax.evaluate: outputs, determinism, bad input, masked pseudo-perplexity and
bits per residue, and (slow, not timed) a briefly trained tiny model whose ELBO beats the
unigram baseline on held-out data."""

import json
import logging
import math
import os
import pathlib
import shutil

import numpy as np
import pytest

from helpers import FAA, cli_fails, config_module, sample_config, save_checkpoint
from sedd_jax import evaluate as evaluate_cli
from sedd_jax.data import pipeline
from sedd_jax.data import prepare
from sedd_jax.data import store as store_lib
from sedd_jax.data import tokenizers
from sedd_jax.sampling import likelihood
from sedd_jax.training import checkpoint as ckpt_lib



@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny model with zero output weights (as initialised): with scale_by_sigma its score is
  uniform over the 32 non-mask tokens, so the expected negative ELBO per token is
  log(32) (1 - e^-sigma(1)) in closed form."""
  tmp = tmp_path_factory.mktemp("evaluate_cli")
  cfg = sample_config(tmp)
  assert cfg.model.scale_by_sigma and cfg.graph.type == "absorb"
  pipeline.ensure_prepared(cfg)
  return save_checkpoint(tmp / "run", cfg, random_output=False)


def unigram_nll(train, evaluated) -> float:
  """Brute force: mean -log p over the evaluated tokens, p = add-one frequencies of the 25
  residue ids 4..28 in `train`."""
  counts = np.ones(25)
  for s in train:
    for t in np.asarray(s):
      counts[t - 4] += 1
  p = counts / counts.sum()
  toks = np.concatenate([np.asarray(s) for s in evaluated])
  return float(-np.mean(np.log(p[toks - 4])))


def test_fasta_and_split(workdir, tmp_path, capsys):
  fa = tmp_path / "e.fasta"
  fa.write_text(">a\nMKVLAAGGSTXEKK\n>b\nMKVLSTBTAAGW\n>c\n" + "A" * 60 + "\n")
  args = ["--workdir", str(workdir), "--fasta", str(fa), "--num-samples", "4",
          "--baseline-fasta", str(fa), "--batch-size", "2"]
  assert evaluate_cli.main(args + ["--out", str(tmp_path / "a.json")]) == 0
  assert evaluate_cli.main(args + ["--out", str(tmp_path / "b.json")]) == 0
  a = json.loads((tmp_path / "a.json").read_text())
  b = json.loads((tmp_path / "b.json").read_text())
  assert a["nelbo_per_token"] == b["nelbo_per_token"]  # same seed, same estimate
  assert a["num_sequences"] == 3 and a["cropped_sequences"] == 1
  assert a["num_tokens"] == 14 + 12 + 48  # the long one cropped to the model length
  assert a["perplexity"] == pytest.approx(math.exp(a["nelbo_per_token"]))
  assert a["se_per_token"] > 0
  # Non-standard residues among the evaluated tokens: one X and one B of 74.
  assert a["nonstandard_fraction"] == pytest.approx(2 / 74)
  assert a["nonstandard_counts"] == {"X": 1, "B": 1, "U": 0, "Z": 0, "O": 0}
  assert a["unigram_alphabet"] == "LAGVSERTIDPKQNFYMHWCXBUZO"
  tok = tokenizers.ProteinTokenizer()
  seqs = [tok.encode(x) for x in ("MKVLAAGGSTXEKK", "MKVLSTBTAAGW", "A" * 60)]
  assert a["unigram_nll_per_token"] == pytest.approx(
      unigram_nll(seqs, [seqs[0], seqs[1], seqs[2][:48]]))
  assert [s["name"] for s in a["per_sequence"]] == ["a", "b", "c"]
  out = capsys.readouterr().out
  assert "non-standard residues 2.70% of the tokens (X 1, B 1)" in out
  assert "add-one frequencies of the 25 residue letters LAGVSERTIDPKQNFYMHWCXBUZO in " in out

  # A split, without --out: the JSON goes to the run folder.
  assert evaluate_cli.main(["--workdir", str(workdir), "--split", "test", "--num-samples", "16",
                            "--antithetic", "--max-sequences", "4"]) == 0
  s = json.loads((workdir / "eval_test.json").read_text())
  assert s["t_sampling"] == "antithetic" and 0 < s["num_sequences"] <= 4
  expected = math.log(32) * (1 - s["terminal_unmasked_prob"])
  assert abs(s["nelbo_per_token"] - expected) < 4 * s["se_per_token"], s
  assert 0 < s["se_per_token"] < 1
  cfg = sample_config(workdir.parent)
  train = store_lib.Store(cfg.data.prepared, "train")
  test = store_lib.Store(cfg.data.prepared, "test")
  evaluated = [np.asarray(test[i])[:48] for i in range(s["num_sequences"])]  # cropped
  assert s["unigram_nll_per_token"] == pytest.approx(
      unigram_nll([train[i] for i in range(len(train))], evaluated))
  assert s["unigram_fitted_on"] == f"{cfg.data.prepared}:train"


def test_default_out_is_in_the_run_folder():
  parse = evaluate_cli.build_parser().parse_args
  assert evaluate_cli.default_out(parse(["--workdir", "runs/x", "--split", "valid"])) == (
      pathlib.Path("runs/x/eval_valid.json"))
  assert evaluate_cli.default_out(parse(["--checkpoint", "runs/x/checkpoints/600", "--fasta",
                                         "d/pdb.faa.gz"])) == pathlib.Path(
      "runs/x/eval_pdb_600.json")


def test_bad_input(workdir, tmp_path, caplog, monkeypatch):
  fa = tmp_path / "bad.fasta"
  fa.write_text(">a\nMKV#LA\n")
  good = tmp_path / "good.fasta"
  good.write_text(">a\nMKVLA\n")
  cases = [
      (["--fasta", str(fa)], "--fasta: {fa}:2: invalid character '#' at column 4 in sequence 'a'"),
      (["--fasta", str(tmp_path / "none.fasta")], "does not exist"),
      (["--split", "valid", "--antithetic", "--num-samples", "3"], "even"),
      (["--split", "valid", "--max-sequences", "0"], "--max-sequences must be >= 1"),
      (["--fasta", str(good), "--baseline-fasta", str(fa)], "--baseline-fasta: {fa}:2"),
  ]

  def no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the inputs were checked")

  with monkeypatch.context() as m:
    m.setattr(ckpt_lib, "load_inference_checkpoint", no_load)
    for extra, match in cases:
      caplog.clear()
      with caplog.at_level(logging.ERROR):
        assert evaluate_cli.main(["--workdir", str(workdir), "--out", str(tmp_path / "o.json")]
                                 + extra) == 2
      assert match.format(fa=fa) in caplog.text, (extra, caplog.text)
      assert "on-error" not in caplog.text  # evaluate has no such option
  bad = save_checkpoint(tmp_path / "bad", sample_config(tmp_path),
                        stored_cfg=sample_config(tmp_path, hidden=64))
  caplog.clear()
  with caplog.at_level(logging.ERROR):
    assert evaluate_cli.main(["--workdir", str(bad), "--fasta", str(good),
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
  cfg = config_module("uniref50").get_config("tiny")
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


def test_checkpoint_without_config_item(workdir, tmp_path):
  """A checkpoint whose config is only in the run folder's config.json (the config is then not
  read ahead of the load): the inputs are checked after the load instead."""
  import shutil

  from sedd_jax import config as config_lib

  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  shutil.rmtree(run / "checkpoints" / "0" / "config")
  (run / "config.json").write_text(config_lib.to_json(sample_config(workdir.parent)))
  fa = tmp_path / "e.fasta"
  fa.write_text(">a\nMKVLAAGGST\n")
  assert evaluate_cli.main(["--workdir", str(run), "--fasta", str(fa), "--num-samples", "2",
                            "--baseline-fasta", str(fa)]) == 0
  assert json.loads((run / "eval_e.json").read_text())["num_tokens"] == 10


def test_pseudo_perplexity_and_bits(workdir, tmp_path, capsys, caplog):
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


def test_outputs_that_would_lose_something_are_refused_before_the_model_loads(
    workdir, tmp_path, caplog, monkeypatch):
  """--out as the --fasta (or a hard link of it), an existing folder, a default output inside
  the checkpoints, a negative seed: one line naming the flags before the model is loaded."""
  def no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the output was checked")

  monkeypatch.setattr(ckpt_lib, "load_inference_checkpoint", no_load)
  fa = tmp_path / "e.fasta"
  fa.write_text(">a\nMKVLA\n")
  os.link(fa, tmp_path / "hard.fasta")
  w = ["--workdir", str(workdir)]
  step = workdir / "checkpoints" / "0"
  for flags, match in (
      (w + ["--fasta", str(fa), "--out", str(fa)],
       f"--out {fa} would overwrite --fasta {fa} (the same file)"),
      (w + ["--fasta", str(fa), "--out", str(tmp_path / "hard.fasta")],
       f"--out {tmp_path / 'hard.fasta'} would overwrite --fasta {fa} (the same file)"),
      (w + ["--split", "test", "--baseline-fasta", str(fa), "--out", str(fa)],
       f"--out {fa} would overwrite --baseline-fasta {fa}"),
      (w + ["--fasta", str(fa), "--out", str(tmp_path)],
       f"--out {tmp_path} is a folder; give a file path"),
      (["--workdir", str(step), "--split", "test"],
       f"--out (default) {step / 'eval_test.json'} lies inside the checkpoints of --workdir "
       f"{workdir / 'checkpoints'}"),
      (w + ["--fasta", str(fa), "--seed", "-3"], "--seed must be an integer in [0, 2^32); got -3"),
  ):
    cli_fails(evaluate_cli.main, flags, caplog, match)
  assert fa.read_text() == ">a\nMKVLA\n" and not (step / "eval_test.json").exists()


def test_the_json_records_the_checkpoint_used(workdir, tmp_path, caplog):
  """Newest checkpoint damaged: the estimate comes from step 0 and the JSON says so (folder,
  step, run, weights, seed); the output's missing folders are created."""
  run = tmp_path / "run"
  shutil.copytree(workdir / "checkpoints" / "0", run / "checkpoints" / "0")
  shutil.copytree(run / "checkpoints" / "0", run / "checkpoints" / "3")
  for f in (run / "checkpoints" / "3" / "ema").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:5])
  fa = tmp_path / "e.fasta"
  fa.write_text(">a\nMKVLAAGGST\n")
  out = tmp_path / "new" / "e.json"
  with caplog.at_level(logging.ERROR):
    assert evaluate_cli.main(["--workdir", str(run), "--fasta", str(fa), "--num-samples", "2",
                              "--baseline-fasta", str(fa), "--seed", "5", "--out",
                              str(out)]) == 0
  assert f"checkpoint {run}/checkpoints/3 cannot be read" in caplog.text
  r = json.loads(out.read_text())
  assert {k: r[k] for k in ("source", "weights", "checkpoint", "step", "run", "seed")} == {
      "source": str(run), "weights": "ema", "checkpoint": str(run / "checkpoints" / "0"),
      "step": 0, "run": str(run), "seed": 5}


def test_the_cli_numbers_are_the_apis(workdir, tmp_path):
  """evaluate's JSON (per sequence and summed) == sedd_jax.load(run).score of the same
  (cropped) sequences with the same seed and settings: one code path."""
  import sedd_jax

  fa = tmp_path / "e.fasta"
  long = "MKVLAAGGST" * 6  # 60 > the model's 48: the CLI crops it, the API is given the crop
  fa.write_text(f">a\nMKVLAAGGSTWY\n>b\nPPLKV\n>c\n{long}\n")
  out = tmp_path / "e.json"
  assert evaluate_cli.main(["--workdir", str(workdir), "--fasta", str(fa), "--num-samples", "4",
                            "--t-sampling", "stratified", "--seed", "7", "--batch-size", "2",
                            "--baseline-fasta", str(fa), "--no-pseudo-perplexity",
                            "--out", str(out)]) == 0
  r = json.loads(out.read_text())
  model = sedd_jax.load(workdir)
  s = model.score(["MKVLAAGGSTWY", "PPLKV", long[:model.max_length]], num_samples=4, seed=7,
                  batch_size=2, t_sampling="stratified")
  assert [e["nelbo"] for e in r["per_sequence"]] == s.nelbo.tolist()
  assert [e["se"] for e in r["per_sequence"]] == s.nelbo_se.tolist()
  assert [e["tokens"] for e in r["per_sequence"]] == [12, 5, 48]
  want = likelihood.summarize([s.to_nelbo_result()], model.noise, total_se=s.total_se)
  assert r["nelbo_per_token"] == want["nelbo_per_token"]
  assert r["se_per_token"] == want["se_per_token"]


def test_an_empty_split_names_the_store_and_how_to_make_one(tmp_path, caplog):
  cfg = sample_config(tmp_path)
  prepare.prepare(FAA, cfg.data.prepared, valid_fraction=0.1, test_fraction=0.0)
  run = save_checkpoint(tmp_path / "run", cfg)
  store = cfg.data.prepared
  cli_fails(evaluate_cli.main, ["--workdir", str(run), "--split", "test"], caplog,
            f"error: --split test: the test split of the store {store} is empty: prepare it "
            f"again with a test share, e.g. python -m sedd_jax.data.prepare --input {FAA} "
            f"--output {store} --test-fraction 0.02 --overwrite")
