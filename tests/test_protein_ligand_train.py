"""The protein-ligand config through the generic CLIs: train (with resume), sample, evaluate."""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from helpers import FAST, MICRO_MODEL, load_config, spy_predictors
from sedd_jax import config as config_lib
from sedd_jax import evaluate as evaluate_cli
from sedd_jax import sample as sample_cli
from sedd_jax import train as train_lib
from sedd_jax.protein_ligand import modes
from sedd_jax.protein_ligand import smiles as smiles_lib
from sedd_jax.training import checkpoint as ckpt_lib
from sedd_jax.training import checkpointer
from sedd_jax.training import metrics as metrics_lib
from sedd_jax.training import task as task_lib

MICRO = {
  **MICRO_MODEL, "model.length": 64, "ligand.length": 48, "training.batch_size": 4,
  "training.steps": 4, "training.log_every": 1, "training.eval_every": 2,
  "training.eval_batches": 1, "training.sample_every": 4, "training.num_samples": 2, "training.ckpt_every": 100,
  "sampling.steps": 4, "sampling.predictor": "first_hitting", "optim.warmup": 1,
  "wandb.mode": "disabled",
}


# Unpaired ligands for the ligand_only steps: the bundled MOSES subset
# (sedd_jax.data.ligand_corpus).
CORPUS = {"data.ligand_corpus": "data/moses_smiles_every8.csv.gz"}


def micro_config(store: pathlib.Path, overrides: dict | None = None):
  return config_lib.apply_overrides(load_config("protein_ligand.py:tiny", MICRO),
                                    {"data.prepared": str(store), **(overrides or {})})


def test_unknown_task_is_a_config_error():
  cfg = load_config()
  with cfg.unlocked():
    cfg.task = "protein_ligand_v2"
  with pytest.raises(config_lib.ConfigError, match="'task'"):
    config_lib.validate(cfg)
  with pytest.raises(config_lib.ConfigError, match="'mode'"):
    load_config("protein_ligand.py:tiny", {"mode": "jiont"})


def test_train_resume_sample_evaluate(tmp_path, monkeypatch):
  store = tmp_path / "store"
  cfg = micro_config(store, CORPUS)
  assert cfg.ligand.graph.tokens == 0  # resolved from the prepared data by the task
  work = tmp_path / "run"
  devices = jax.devices()[:2]
  predictors = spy_predictors(monkeypatch)  # the config's first_hitting reaches the sampler
  first = train_lib.train(cfg, work, stop_after=2, devices=devices, compiler_options=FAST)
  assert (first.code, first.step) == (0, 2)
  saved = json.loads((work / "config.json").read_text())
  assert saved["task"] == "protein_ligand" and saved["ligand"]["graph"]["tokens"] > 0
  assert checkpointer.Checkpointer(work).all_steps() == [2]
  again = train_lib.train(micro_config(store, CORPUS), work, devices=devices,
                          compiler_options=FAST)
  assert (again.code, again.step, again.reason) == (0, 4, "finished")
  assert checkpointer.Checkpointer(work).all_steps() == [2, 4]

  rows = metrics_lib.read_metrics(work / metrics_lib.METRICS_FILE)
  train_rows = [r for r in rows if r["kind"] == "train"]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  for r in train_rows:  # the loss of the step's mode (`all` draws one per step)
    mode_keys = [k for k in r if k.startswith("loss/")]
    assert len(mode_keys) == 1 and r[mode_keys[0]] == pytest.approx(r["loss"])
    assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
  evals = [r for r in rows if r["kind"] == "eval"]
  assert [r["step"] for r in evals] == [0, 2, 4]
  assert all(np.isfinite(evals[-1][f"valid_loss/{m}"]) for m in modes.MODES)
  sample_rows = [r for r in rows if r["kind"] == "sample"]
  assert [r["step"] for r in sample_rows] == [4]
  assert predictors == ["first_hitting"]  # the in-training ligands (traced once)
  smi = (work / "samples" / "step_4.smi").read_text().splitlines()
  assert len(smi) == 2 and all("\tvalid_protein_" in line for line in smi)
  # The logged validity is the share of the written SMILES that the checker accepts.
  _, is_valid = smiles_lib.validity_checker()
  assert sample_rows[0]["smiles_validity"] == pytest.approx(
      np.mean([bool(is_valid(line.split("\t")[0])) for line in smi]))

  # The inference loader rebuilds the dual-track model from the saved config.
  model, loaded_cfg, graph, _ = ckpt_lib.load_for_inference(work)
  assert type(model).__name__ == "ProteinLigandDDiT"
  assert task_lib.task_name(loaded_cfg) == "protein_ligand" and graph.dim == 33

  out = tmp_path / "ligands.smi"
  assert sample_cli.main(["--workdir", str(work), "--out", str(out), "--num", "3",
                          "--steps", "4", "--reveal-order", "confidence"]) == 0
  lines = out.read_text().splitlines()
  assert [line.split("\t")[1] for line in lines] == ["test_0", "test_1", "test_2"]
  report = json.loads(out.with_suffix(".validity.json").read_text())
  assert report["task"] == "ligand_given_protein" and report["num"] == 3
  assert report["predictor"] == "first_hitting"  # cfg.sampling.predictor
  assert report["reveal_order"] == "confidence" and report["temperature"] == 1.0
  assert report["checker"] == smiles_lib.validity_checker()[0]
  assert [s["smiles"] for s in report["samples"]] == [line.split("\t")[0] for line in lines]
  valid = [bool(is_valid(s["smiles"])) for s in report["samples"]]
  assert [s["valid"] for s in report["samples"]] == valid
  assert report["num_valid"] == sum(valid) and report["validity"] == pytest.approx(sum(valid) / 3)

  # Joint pairs from noise, without RDKit: FASTA + SMILES, the report names the grammar check.
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "rdkit", None)  # `import rdkit` fails
    pairs = tmp_path / "pairs.fasta"
    assert sample_cli.main(["--workdir", str(work), "--out", str(pairs), "--num", "3",
                            "--steps", "4", "--task", "joint", "--ligand-length", "5",
                            "--temperature", "0.7"]) == 0
  records = pairs.read_text().split(">")[1:]
  smi = pairs.with_suffix(".smi").read_text().splitlines()
  report = json.loads(pairs.with_suffix(".validity.json").read_text())
  assert len(records) == 3 and report["task"] == "joint" and report["checker"] == "grammar"
  assert report["temperature"] == 0.7 and "temperature=0.7" in records[0].split("\n")[0]
  assert report["predictor"] == "first_hitting"
  for i, (rec, line, sample) in enumerate(zip(records, smi, report["samples"])):
    head, seq = rec.strip().split("\n")
    smiles = line.split("\t")[0]
    assert head.startswith(f"sample_{i} ligand={smiles} ") and line.endswith(f"\tsample_{i}")
    assert sample["smiles"] == smiles and sample["valid"] == smiles_lib.grammar_valid_smiles(smiles)
    assert 1 <= len(seq) <= 64 and set(seq) <= set("ACDEFGHIKLMNPQRSTVWYXBUZO")  # ids 4..28
  # Guidance (the config trains both scores: mode `all`); joint takes none.
  guided = tmp_path / "guided.smi"
  assert sample_cli.main(["--workdir", str(work), "--out", str(guided), "--num", "2",
                          "--steps", "4", "--guidance", "2.5", "--predictor", "analytic",
                          "--temperature", "0.5"]) == 0
  report = json.loads(guided.with_suffix(".validity.json").read_text())
  assert report["guidance"] == 2.5 and report["num"] == 2 and report["predictor"] == "analytic"
  assert report["temperature"] == 0.5
  assert sample_cli.main(["--workdir", str(work), "--out", str(pairs), "--task", "joint",
                          "--guidance", "2"]) == 2
  # Ligands for the proteins of a FASTA (--num each), and proteins for the split's ligands.
  fasta = tmp_path / "given.fasta"
  fasta.write_text(">p1 first\nMKTAYIAK\n>p2\nGSHMLE\n")
  given = tmp_path / "given.smi"
  assert sample_cli.main(["--workdir", str(work), "--out", str(given), "--num", "2",
                          "--steps", "4", "--proteins", str(fasta), "--ligand-length", "5"]) == 0
  assert [line.split("\t")[1] for line in given.read_text().splitlines()] == ["p1", "p1", "p2",
                                                                              "p2"]
  prot = tmp_path / "proteins.fasta"
  assert sample_cli.main(["--workdir", str(work), "--out", str(prot), "--num", "2", "--steps",
                          "4", "--task", "protein_given_ligand", "--length", "7"]) == 0
  records = [r.strip().split("\n") for r in prot.read_text().split(">")[1:]]
  assert [h.split(" ref=")[1].split(" ")[0] for h, _ in records] == ["test_0", "test_1"]
  assert all(len(seq) == 7 and "task=protein_given_ligand" in h and "predictor=first_hitting" in h
             for h, seq in records)

  ev = tmp_path / "eval.json"
  assert evaluate_cli.main(["--workdir", str(work), "--split", "test", "--out", str(ev),
                            "--max-sequences", "4", "--num-samples", "1",
                            "--batch-size", "4"]) == 0
  result = json.loads(ev.read_text())
  assert result["num_pairs"] == 4
  for m in modes.MODES:
    assert result[f"loss/{m}"] > 0 and result["losses"][m]["loss_per_token"] > 0
