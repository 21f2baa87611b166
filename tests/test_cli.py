"""The shared CLI plumbing (`sedd_jax.cli`), model loading checks (`sedd_jax.inference`) and
reference data helpers (`sedd_jax.data.reference`)."""

import argparse
import logging

import numpy as np
import pytest

from helpers import load_config
from sedd_jax import cli
from sedd_jax import inference
from sedd_jax.data import reference
from sedd_jax.data import store as store_lib
from sedd_jax.data import tokenizers



@pytest.mark.parametrize("error", [cli.CliError("bad flag"), store_lib.StoreError("bad store")])
def test_run_cli_reports_bad_input_in_one_line_with_exit_2(error, caplog):
  def fail(args):
    raise error

  with caplog.at_level(logging.ERROR):
    assert cli.run_cli(argparse.ArgumentParser(), fail, []) == 2
  assert [r.getMessage() for r in caplog.records] == [f"error: {error}"]


def test_run_cli_returns_the_exit_code_and_passes_verbose():
  seen = []
  assert cli.run_cli(argparse.ArgumentParser(), lambda a: seen.append(a.verbose) or 7,
                     ["--verbose"]) == 7
  assert seen == [True]


def test_load_config_names_the_flag():
  with pytest.raises(cli.CliError, match="--config nonexistent.py"):
    cli.load_config("nonexistent.py")


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


def test_pad_tokens():
  tokens, lengths = reference.pad_tokens([np.array([5, 6, 7]), np.array([8])], 4)
  pad = tokenizers.PAD_ID
  np.testing.assert_array_equal(tokens, [[5, 6, 7, pad], [8, pad, pad, pad]])
  np.testing.assert_array_equal(lengths, [3, 1])
  assert tokens.dtype == np.int32 and lengths.dtype == np.int32


def test_reference_pairs_of_a_missing_store_say_what_to_run(tmp_path):
  cfg = load_config(overrides={"data.prepared": str(tmp_path / "none")})
  with pytest.raises(store_lib.StoreError, match="run python -m sedd_jax.data.prepare"):
    reference.reference_pairs(cfg, "test")
  assert reference.training_split(cfg) is None


def test_json_safe_replaces_non_finite_floats():
  obj = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "x", "e": 2}
  assert cli.json_safe(obj) == {"a": None, "b": [1.0, None, {"c": None}], "d": "x", "e": 2}


def test_protein_ligand_losses_per_token_of_the_scored_tracks():
  from sedd_jax import evaluate_protein_ligand as pl_evaluate
  from sedd_jax.protein_ligand import modes

  assert tuple(pl_evaluate.SCORED) == modes.MODES
  means = {f"loss/{m}": float(i + 1) for i, m in enumerate(modes.MODES)}
  got = pl_evaluate.per_mode(means, {"protein": 40.0, "ligand": 10.0}, n=2)
  assert got["protein_only"]["loss_per_token"] == 1.0 * 2 / 40
  assert got["ligand_only"]["loss_per_token"] == 2.0 * 2 / 10
  assert got["ligand_given_protein"]["loss_per_token"] == 3.0 * 2 / 10
  assert got["protein_given_ligand"]["loss_per_token"] == 4.0 * 2 / 40
  assert got["joint"]["loss_per_token"] == 2 * 5.0 * 2 / 50  # the mean of the two tracks
  assert got["joint"]["scored_tracks"] == ("protein", "ligand") and got["joint"]["loss"] == 5.0
