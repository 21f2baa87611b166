"""Loading a trained model for sample/evaluate: a saved checkpoint round trip, the config read
ahead of the load, model-shape checks naming every differing key, and clear errors."""

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
  model, loaded, graph, noise = inference.load_model(str(run), use_ema=True)
  assert loaded.to_dict() == cfg.to_dict() and graph.dim == 33 and graph.absorb
  kernel = model.output_layer.linear.kernel[...]
  want = np.random.default_rng(3).normal(size=kernel.shape).astype(np.float32)
  np.testing.assert_array_equal(kernel, want)  # the saved weights, not a fresh init
  assert isinstance(model, nnx.Module) and not inference.is_protein_ligand(loaded)
  wider = f"{UNIREF50}:tiny"
  with pytest.raises(cli.CliError, match="another model shape than --config"):
    inference.load_model(str(run), config_spec=wider)


def test_missing_or_empty_paths_are_clear_errors(tmp_path):
  with pytest.raises(cli.CliError, match="does not exist"):
    inference.load_model(str(tmp_path / "none"))
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
