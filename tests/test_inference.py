"""Loading a trained model for sample/evaluate: a saved checkpoint round trip, the config read
ahead of the load, model-shape checks naming every differing key, and clear errors."""

import re

import numpy as np
import pytest
from flax import nnx

from sedd_jax import cli
from helpers import UNIREF50, load_config, sample_config, save_checkpoint
from sedd_jax import inference


def test_load_model_round_trip_and_read_config(tmp_path):
  cfg = sample_config(tmp_path)
  run = save_checkpoint(tmp_path / "run", cfg, seed=3)
  peeked = inference.read_config(str(run))
  assert peeked.to_dict() == cfg.to_dict()
  loaded = inference.load_model(str(run), weights="ema")
  model, graph = loaded.model, loaded.graph
  assert loaded.cfg.to_dict() == cfg.to_dict() and graph.dim == 33 and graph.absorb
  kernel = model.output_layer.linear.kernel[...]
  want = np.random.default_rng(3).normal(size=kernel.shape).astype(np.float32)
  np.testing.assert_array_equal(kernel, want)  # the saved weights, not a fresh init
  assert isinstance(model, nnx.Module) and not inference.is_protein_ligand(loaded.cfg)
  # What the outputs record: the weights, the checkpoint folder, its step and the run.
  assert inference.provenance(loaded) == {
      "weights": "ema", "checkpoint": str(run / "checkpoints" / "0"), "step": 0,
      "run": str(run)}
  wider = f"{UNIREF50}:tiny"
  with pytest.raises(cli.CliError, match="another model shape than --config"):
    inference.load_model(str(run), config_spec=wider)


def test_a_damaged_checkpoint_is_reported_as_damaged(tmp_path):
  """Truncated EMA arrays: the error names the checkpoint, the array and its folder, and says
  the files are damaged, not that the model has another shape."""
  run = save_checkpoint(tmp_path / "run", sample_config(tmp_path))
  step = run / "checkpoints" / "0"
  for f in (step / "ema").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:5])
  with pytest.raises(cli.CliError) as e:
    inference.load_model(str(run))
  assert re.fullmatch(
      rf"cannot load a model from {run}: no checkpoint can be read, the files of each are "
      rf"damaged \(truncated, overwritten or missing\): {step}: [A-Z_]+: Error [^;]* in OCDBT "
      rf"database at local file \"{step}/ema/\": .*", str(e.value)), str(e.value)
  assert "another model shape" not in str(e.value)


def test_protected_paths_of_a_run(tmp_path):
  """The run's checkpoints, the config.json files read_config may read and the data store."""
  from sedd_jax.data import pipeline

  cfg = sample_config(tmp_path)
  pipeline.ensure_prepared(cfg)
  run = save_checkpoint(tmp_path / "run", cfg)
  (run / "config.json").write_text("{}")
  store = ("the data store (data.prepared) of the checkpoint", tmp_path / "prep")
  assert inference.protected_paths(str(run), "--workdir", cfg) == (
      [("the config.json of --workdir", run / "config.json")],
      dict([store, ("the checkpoints of --workdir", run / "checkpoints")]))
  step = run / "checkpoints" / "0"
  assert inference.protected_paths(str(step), "--checkpoint") == (
      [("the config.json of --checkpoint", run / "config.json")],
      {"the checkpoints of --checkpoint": run / "checkpoints"})
  lone = save_checkpoint(tmp_path / "lone", cfg) / "checkpoints" / "0"
  lone = lone.rename(tmp_path / "step")  # a checkpoint folder outside any run
  assert inference.protected_paths(str(lone), "--checkpoint") == (
      [], {"the checkpoint of --checkpoint": lone})
  assert inference.protected_paths(str(tmp_path / "none"), "--workdir") == ([], {})


def test_a_bundle_loads_with_its_provenance_and_protected_files(workdir, tmp_path):
  """An exported bundle: the same weights as its run; the outputs record where they come from
  and the bundle; its files are inputs no output may replace; other weights are refused."""
  from sedd_jax import bundle
  from sedd_jax import export

  out = tmp_path / "bundle"
  assert export.main(["--workdir", str(workdir), "--out", str(out)]) == 0
  assert inference.read_config(str(out)).to_dict() == inference.read_config(
      str(workdir)).to_dict()
  loaded = inference.load_model(str(out))
  want = bundle.flat_params(inference.load_model(str(workdir)).model)
  got = bundle.flat_params(loaded.model)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])
  assert inference.provenance(loaded) == {
      "weights": "ema", "checkpoint": str(workdir / "checkpoints" / "0"), "step": 0,
      "run": str(workdir), "bundle": str(out)}
  assert inference.protected_paths(str(out), "--workdir") == ([
      (f"the {n} of the bundle --workdir", out / n)
      for n in ("config.json", "data_stats.json", "model.safetensors")], {})
  with pytest.raises(cli.CliError) as e:
    inference.load_model(str(out), weights="raw")
  assert str(e.value) == (f"weights='raw': the bundle {out} holds the ema weights (export it "
                          "with --weights raw for those)")


def test_missing_or_empty_paths_are_clear_errors(tmp_path):
  with pytest.raises(cli.CliError) as e:
    inference.load_model(str(tmp_path / "none"))
  assert str(e.value) == f"path {tmp_path / 'none'} does not exist"
  assert inference.read_config(str(tmp_path)) is None  # no checkpoint: load_model says why
  with pytest.raises(cli.CliError):
    inference.load_model(str(tmp_path))


def test_is_protein_ligand_reads_the_task():
  cfg = load_config("protein_ligand.py:tiny")
  assert inference.is_protein_ligand(cfg)


def test_check_same_shape_names_every_differing_key():
  a = load_config()
  b = load_config(overrides={"model.n_blocks": a.model.n_blocks + 1, "graph.type": "uniform",
                             "model.scale_by_sigma": False})
  inference.check_same_shape(a, a, "ck", "spec")  # same shape: no error
  with pytest.raises(cli.CliError) as e:
    inference.check_same_shape(a, b, "ck", "spec")
  msg = str(e.value)
  assert f"model.n_blocks: checkpoint {a.model.n_blocks}, config {a.model.n_blocks + 1}" in msg
  assert "graph.type: checkpoint absorb, config uniform" in msg and "model.length" not in msg
  assert not inference.is_protein_ligand(a)
