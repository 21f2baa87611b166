"""The shared CLI plumbing (`sedd_jax.cli`) and reference data helpers
(`sedd_jax.data.reference`)."""

import argparse
import logging
import pathlib

import numpy as np
import pytest

from sedd_jax import cli
from sedd_jax import config as config_lib
from sedd_jax.data import reference
from sedd_jax.data import store as store_lib
from sedd_jax.data import tokenizers

ROOT = pathlib.Path(__file__).resolve().parents[1]


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


def test_pad_tokens():
  tokens, lengths = reference.pad_tokens([np.array([5, 6, 7]), np.array([8])], 4)
  pad = tokenizers.PAD_ID
  np.testing.assert_array_equal(tokens, [[5, 6, 7, pad], [8, pad, pad, pad]])
  np.testing.assert_array_equal(lengths, [3, 1])
  assert tokens.dtype == np.int32 and lengths.dtype == np.int32


def test_reference_pairs_of_a_missing_store_say_what_to_run(tmp_path):
  cfg = config_lib.load_config(str(ROOT / "configs/uniref50.py:tiny"),
                               {"data.prepared": str(tmp_path / "none")})
  with pytest.raises(store_lib.StoreError, match="run python -m sedd_jax.data.prepare"):
    reference.reference_pairs(cfg, "test")
  assert reference.training_sequences(cfg) is None


def test_json_safe_replaces_non_finite_floats():
  obj = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "x", "e": 2}
  assert cli.json_safe(obj) == {"a": None, "b": [1.0, None, {"c": None}], "d": "x", "e": 2}
