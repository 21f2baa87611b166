"""python -m sedd_jax.export: run -> bundle -> sedd_jax.load gives the run's parameters bit for
bit and its scores; the model card and data statistics; what the CLI refuses."""

import functools
import json

import numpy as np
import pytest

from helpers import cli_fails
import sedd_jax
from sedd_jax import bundle
from sedd_jax import export

_fails = functools.partial(cli_fails, export.main)


def test_run_to_bundle_gives_the_same_model_and_scores(workdir, tmp_path, capsys):
  """The conftest run (random output weights, its data prepared) exported with an eval file."""
  (workdir / "eval_valid.json").write_text(json.dumps(
      {"data": "prep:valid", "nelbo_per_token": 3.1, "perplexity": 22.2}))
  out = tmp_path / "bundle"
  assert export.main(["--workdir", str(workdir), "--out", str(out)]) == 0
  assert f"exported step 0 (ema weights) of {workdir}/checkpoints/0 to {out}" in (
      capsys.readouterr().out)
  assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "data_stats.json",
                                                   "model.safetensors"]
  run, packed = sedd_jax.load(workdir), sedd_jax.load(out)
  want, got = bundle.flat_params(run.model), bundle.flat_params(packed.model)
  assert want.keys() == got.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])
  assert packed.cfg.to_dict() == run.cfg.to_dict()
  assert packed.source["kind"] == "bundle" and packed.step == 0 and packed.weights == "ema"
  assert packed.source["exported_from"]["checkpoint"] == str(workdir / "checkpoints" / "0")
  # The training data's statistics travel with the bundle: lengths="from-data" draws the same.
  assert packed.data_stats().to_json() == run.data_stats().to_json()
  seqs = ["MKVLLAAGGHHK", "WWPLKVAA", "A" * 30, "MKT"]  # test_api's: its compiled program
  a, b = run.score(seqs, num_samples=16), packed.score(seqs, num_samples=16)
  for field in ("nelbo", "nelbo_se", "per_residue", "length"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert b.provenance["source"]["path"] == str(out)
  card = (out / "README.md").read_text()
  assert "`eval_valid.json` (prep:valid): negative ELBO (nats/token) 3.1, perplexity 22.2" in card
  assert "checkpoint step 0 of" in card


def test_refusals_and_raw_weights(workdir, tmp_path, caplog):
  (tmp_path / "file").write_text("keep")
  base = ["--workdir", str(workdir), "--out"]
  _fails(base + [str(tmp_path / "file")], caplog, f"--out: {tmp_path / 'file'} exists and is not "
         "a folder; refusing to overwrite it")
  assert (tmp_path / "file").read_text() == "keep"
  _fails(base + [str(workdir)], caplog, "is a folder that is not a sedd_jax bundle")
  _fails(["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "b")], caplog,
         f"--workdir: path {tmp_path / 'none'} does not exist")
  out = tmp_path / "raw"
  assert export.main(base + [str(out), "--weights", "raw"]) == 0
  assert bundle.read_meta(out)["source"]["weights"] == "raw"
  _fails(base + [str(out)], caplog, "is a bundle already; pass overwrite (--overwrite)")
  _fails(["--workdir", str(out), "--out", str(tmp_path / "again")], caplog,
         f"--workdir {out} is a bundle already; give the run folder it came from")
  assert export.main(base + [str(out), "--overwrite"]) == 0
  assert bundle.read_meta(out)["source"]["weights"] == "ema"
  with pytest.raises(ValueError) as e:
    sedd_jax.load(out, weights="raw")
  assert str(e.value) == (f"weights='raw': the bundle {out} holds the ema weights (export it "
                          "with --weights raw for those)")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "raw"]  # nothing left behind


def test_sample_and_evaluate_give_a_bundle_the_numbers_of_its_run(workdir, tmp_path):
  """`sample` / `evaluate --workdir BUNDLE` == `--workdir RUN` (sequences, lengths drawn from
  the data statistics, ELBO numbers); the outputs record the bundle; --weights raw of a run
  is recorded as such and refused for an EMA bundle (one line, exit 2)."""
  from helpers import read_records
  from sedd_jax import evaluate as evaluate_cli
  from sedd_jax import sample as sample_cli

  out = tmp_path / "bundle"
  assert export.main(["--workdir", str(workdir), "--out", str(out)]) == 0
  fa = tmp_path / "e.fasta"
  fa.write_text(">a\nMKVLAAGGSTWY\n>b\nPPLKV\n")
  evals, samples = {}, {}
  for name, src in (("run", workdir), ("bundle", out)):
    js = tmp_path / f"{name}.json"
    assert evaluate_cli.main(["--workdir", str(src), "--fasta", str(fa), "--num-samples", "4",
                              "--baseline-fasta", str(fa), "--out", str(js)]) == 0
    evals[name] = json.loads(js.read_text())
    fasta = tmp_path / f"{name}.fasta"
    assert sample_cli.main(["--workdir", str(src), "--num", "3", "--lengths", "from-data",
                            "--steps", "4", "--seed", "2", "--out", str(fasta)]) == 0
    samples[name] = read_records(fasta)
  for key in ("nelbo_per_token", "se_per_token", "per_sequence", "pseudo_perplexity", "step",
              "checkpoint", "weights"):
    assert evals["bundle"][key] == evals["run"][key], key
  assert evals["bundle"]["bundle"] == str(out) and "bundle" not in evals["run"]
  assert [s for _, s in samples["bundle"]] == [s for _, s in samples["run"]]
  assert f"bundle={out}" in samples["bundle"][0][0]
  raw = tmp_path / "raw.fasta"
  assert sample_cli.main(["--workdir", str(workdir), "--num", "1", "--length", "5", "--steps",
                          "2", "--weights", "raw", "--out", str(raw)]) == 0
  assert " weights=raw " in read_records(raw)[0][0]
  assert sample_cli.main(["--workdir", str(out), "--num", "1", "--length", "5", "--weights",
                          "raw", "--out", str(raw)]) == 2


def test_a_bundle_without_the_data_store_keeps_the_unigram_and_the_report(workdir, tmp_path,
                                                                          caplog):
  """The data store moved away: `evaluate --workdir BUNDLE` gives the run's unigram baseline
  (from data_stats.json's counts, the run's from the store), `sample --report` the run's
  composition and KL, with novelty null, the missing input named in the JSON and in one log
  line."""
  import logging
  import pathlib

  from sedd_jax import evaluate as evaluate_cli
  from sedd_jax import sample as sample_cli

  out = tmp_path / "bundle"
  assert export.main(["--workdir", str(workdir), "--out", str(out)]) == 0
  fa = tmp_path / "e.fasta"
  fa.write_text(">a\nMKVLAAGGSTWY\n>b\nPPLKV\n")
  prep = pathlib.Path(bundle.read_config(out).data.prepared)

  def both(src, name):
    js, fasta = tmp_path / f"{name}.json", tmp_path / f"{name}.fasta"
    assert evaluate_cli.main(["--workdir", str(src), "--fasta", str(fa), "--num-samples", "2",
                              "--no-pseudo-perplexity", "--out", str(js)]) == 0
    assert sample_cli.main(["--workdir", str(src), "--num", "3", "--length", "8", "--steps",
                            "2", "--report", "--out", str(fasta)]) == 0
    return (json.loads(js.read_text()),
            json.loads(fasta.with_suffix(".report.json").read_text()))

  ev_run, rep_run = both(workdir, "run")
  assert ev_run["unigram_fitted_on"] == f"{prep}:train"
  assert rep_run["novelty"] is not None and "missing" not in rep_run
  away = prep.with_name(prep.name + ".away")
  prep.rename(away)
  try:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      ev, rep = both(out, "bundle")
  finally:
    away.rename(prep)
  assert ev["unigram_nll_per_token"] == pytest.approx(ev_run["unigram_nll_per_token"], abs=1e-12)
  assert ev["unigram_fitted_on"] == f"{prep}:train (its counts in {out}/data_stats.json)"
  assert rep["composition"]["data"].keys() == rep_run["composition"]["data"].keys()
  for a, f in rep_run["composition"]["data"].items():
    assert rep["composition"]["data"][a] == pytest.approx(f, abs=1e-12), a
  assert rep["composition"]["samples"] == rep_run["composition"]["samples"]
  assert rep["composition"]["kl_samples_data_nats"] == pytest.approx(
      rep_run["composition"]["kl_samples_data_nats"], abs=1e-12)
  assert rep["novelty"] is None
  missing = f"no prepared training data at {prep} (data.prepared)"
  assert rep["missing"] == f"novelty needs the reference sequences: {missing}"
  lines = [r.getMessage() for r in caplog.records if "--report" in r.getMessage()]
  assert lines == [f"--report: {missing}: composition from the bundle's data_stats.json, "
                   "novelty against the training set skipped"]
  assert (tmp_path / "bundle.report.png").stat().st_size > 1000
