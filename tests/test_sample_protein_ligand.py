"""The protein-ligand half of python -m sedd_jax.sample: flag checks against the config (before
the model is loaded), the samples drawn through the API, and the validity report file."""

import functools
import json

import pytest
from flax import nnx

from helpers import MICRO_MODEL, PAIRS, cli_fails, load_config, randomize
import sedd_jax
from sedd_jax import config as config_lib
from sedd_jax import sample as sample_cli
from sedd_jax import sample_protein_ligand as pl_sample
from sedd_jax.cli import CliError
from sedd_jax.data import pipeline
from sedd_jax.protein_ligand import model as pl_model
from sedd_jax.training import checkpoint as ckpt_lib

CFG = load_config("protein_ligand.py:tiny", {
    **MICRO_MODEL, "model.length": 64, "ligand.length": 48, "ligand.graph.tokens": 40})
_fails = functools.partial(cli_fails, sample_cli.main)


def _args(*flags):
  return sample_cli.build_parser().parse_args(["--workdir", "w", "--out", "o", *flags])


def test_task_and_the_flags_that_do_not_apply():
  assert pl_sample.check_protein_ligand_args(_args(), CFG) == CFG.sampling.task
  assert pl_sample.check_protein_ligand_args(_args("--task", "joint"), CFG) == "joint"
  for task in pl_sample.PL_TASKS:  # issue 19: every task, with guidance where it applies
    guidance = [] if task == "joint" else ["--guidance", "2"]
    assert pl_sample.check_protein_ligand_args(
        _args("--task", task, "--predictor", "first_hitting", *guidance), CFG) == task
  uniform = load_config("protein_ligand.py:tiny", {
      **MICRO_MODEL, "graph.type": "uniform", "ligand.graph.type": "uniform",
      "model.scale_by_sigma": False})
  with pytest.raises(CliError, match="--predictor first_hitting needs the absorbing graph"):
    pl_sample.check_protein_ligand_args(_args("--predictor", "first_hitting"), uniform)
  for flags, match in ((["--task", "joint", "--guidance", "2"], "not joint"),
                       (["--task", "joint", "--proteins", "p.fa"], "joint does not take them"),
                       (["--draw", "reference"], "are for protein checkpoints"),
                       (["--remask", "0.5"], "are for protein checkpoints"),
                       (["--cached"], "--cached does not apply"),
                       (["--batch-size", "0"], "--batch-size must be >= 1"),
                       (["--steps", "0"], "--steps must be >= 1; got 0"),
                       (["--temperature", "-1"], "--temperature must be a finite number > 0")):
    with pytest.raises(CliError, match=match):
      pl_sample.check_protein_ligand_args(_args(*flags), CFG)


def test_write_validity_records_settings_and_every_sample(tmp_path):
  out = tmp_path / "x.smi"
  report = pl_sample.write_validity(out, ["CCO", "C(C"], ["a", "b"], [3, 3], {"seed": 7},
                                    "grammar", 0.0, references=["CC", "CN"])
  saved = json.loads(out.with_suffix(".validity.json").read_text())
  assert saved == report and saved["seed"] == 7 and saved["checker"] == "grammar"
  assert saved["num_valid"] == 1 and saved["validity"] == 0.5
  assert saved["samples"][1] == {"name": "b", "smiles": "C(C", "valid": False, "length": 3,
                                 "reference": "CN"}


def test_flags_are_checked_before_the_model_is_loaded(tmp_path, caplog, monkeypatch):
  cfg = CFG
  model = pl_model.build_model(cfg, nnx.Rngs(0))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  ckpt_lib.save_inference_checkpoint(tmp_path / "pl" / "checkpoints" / "0", params, cfg)

  def no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the flags were checked")

  monkeypatch.setattr(ckpt_lib, "load_inference_checkpoint", no_load)
  base = ["--workdir", str(tmp_path / "pl"), "--out", str(tmp_path / "l.smi")]
  _fails(base + ["--motif", "MKV@0"], caplog, "--motif does not apply to protein-ligand")
  _fails(base + ["--ligand-length", "49"], caplog, "--ligand-length 49 must lie in [1, 48]")
  _fails(base + ["--proteins", str(tmp_path / "none.fasta")], caplog, "does not exist")
  _fails(base + ["--task", "protein_given_ligand", "--length", "65"], caplog,
         "--length 65 must lie in [1, 64]")
  # Outputs: the SMILES file of joint must not be --out, nor any output an input.
  _fails(base[:2] + ["--task", "joint", "--out", str(tmp_path / "j.smi")], caplog,
         f"--out {tmp_path / 'j.smi'}: joint writes FASTA there and the SMILES to <stem>.smi")
  prots = tmp_path / "p.validity.json"
  prots.write_text(">p\nMKV\n")
  _fails(base[:2] + ["--proteins", str(prots), "--out", str(prots)], caplog,
         f"--out {prots} would overwrite --proteins {prots} (the same file)")
  _fails(base[:2] + ["--proteins", str(prots), "--out", str(tmp_path / "p.smi")], caplog,
         f"the validity report (<out stem>.validity.json) {prots} would overwrite --proteins "
         f"{prots} (the same file)")
  _fails(base[:2] + ["--task", "joint", "--out", str(tmp_path / "pl" / "checkpoints" / "j.fa")],
         caplog, f"lies inside the checkpoints of --workdir {tmp_path / 'pl' / 'checkpoints'}")
  assert prots.read_text() == ">p\nMKV\n"


def test_run_settings_record_the_checkpoint_used():
  """What every protein-ligand output records: the settings, the seed and the checkpoint."""
  source = {"weights": "ema", "checkpoint": "/r/checkpoints/4", "step": 4, "run": "/r"}
  assert pl_sample.run_settings(_args("--seed", "3"), 8, "analytic", 1e-5, 2, source) == {
      "steps": 8, "predictor": "analytic", "eps": 1e-5, "temperature": 1.0,
      "reveal_order": "random", "seed": 3, "batch_size": 2, "weights": "ema",
      "checkpoint": "/r/checkpoints/4", "step": 4, "run": "/r"}


def test_ligands_for_given_proteins_are_the_apis(tmp_path):
  """Issue 31: the CLI draws through `ProteinLigandModel.sample_ligands` (same seed and
  settings, the same SMILES; the FASTA protein longer than the model cropped to its length),
  whatever --batch-size."""
  cfg = config_lib.apply_overrides(load_config("protein_ligand.py:tiny", {
      **MICRO_MODEL, "model.length": 64, "ligand.length": 48, "sampling.steps": 3}),
      {"data.fasta": str(PAIRS), "data.prepared": str(tmp_path / "store")})
  pipeline.ensure_prepared(cfg)
  model = randomize(pl_model.build_model(cfg, nnx.Rngs(0)))  # a score that depends on the input
  _, params, _ = nnx.split(model, nnx.Param, ...)
  ckpt_lib.save_inference_checkpoint(tmp_path / "run" / "checkpoints" / "1", params, cfg)
  long = "MKVLLAAGGHWWKKLLPP" * 4  # 72 residues > model.length 64
  fasta = tmp_path / "p.fasta"
  fasta.write_text(f">a\nMKVLLAAGGH\n>b\n{long}\n")
  outs = []
  for bs in ("1", "4"):
    out = tmp_path / f"l{bs}.smi"
    assert sample_cli.main(["--workdir", str(tmp_path / "run"), "--out", str(out), "--proteins",
                            str(fasta), "--num", "2", "--ligand-length", "5", "--seed", "3",
                            "--temperature", "0.7", "--batch-size", bs, "--split", "train"]) == 0
    outs.append([line.split("\t") for line in out.read_text().splitlines()])
  expected = sedd_jax.load(tmp_path / "run").sample_ligands(
      ["MKVLLAAGGH", long[:64]], num_per_protein=2, ligand_length=5, seed=3, temperature=0.7)
  assert outs[0] == outs[1] == [[x, name] for x, name in zip(expected, "aabb")]
  assert len(set(expected)) > 1  # the samples differ: their keys do
