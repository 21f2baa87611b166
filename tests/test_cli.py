"""The shared CLI plumbing (`sedd_jax.cli`)."""

import argparse
import logging

import pytest

from sedd_jax import cli
from sedd_jax.data import store as store_lib


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




def test_json_safe_replaces_non_finite_floats():
  obj = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "x", "e": 2}
  assert cli.json_safe(obj) == {"a": None, "b": [1.0, None, {"c": None}], "d": "x", "e": 2}
