"""The shared CLI plumbing (`sedd_jax.cli`)."""

import argparse
import logging
import os
import re
import sys

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


def test_check_seed_names_the_flag():
  cli.check_seed(0)
  cli.check_seed(2**32 - 1)
  for bad in (-3, 2**32):
    with pytest.raises(cli.CliError, match=re.escape(
        f"--seed must be an integer in [0, 2^32); got {bad}")):
      cli.check_seed(bad)


def test_check_outputs_refuses_an_output_that_is_an_input(tmp_path, monkeypatch):
  """The same path (as given or relative), a symlink and a hard link of an input are refused,
  naming both flags; the input is left as it was."""
  fasta = tmp_path / "in.fasta"
  fasta.write_text(">a\nMKV\n")
  (tmp_path / "link.fasta").symlink_to(fasta)
  os.link(fasta, tmp_path / "hard.fasta")
  monkeypatch.chdir(tmp_path)
  for out in (fasta, "in.fasta", "./sub/../in.fasta", tmp_path / "link.fasta",
              tmp_path / "hard.fasta"):
    (tmp_path / "sub").mkdir(exist_ok=True)
    with pytest.raises(cli.CliError, match=re.escape(
        f"--out {out} would overwrite --template {fasta} (the same file); choose another "
        "output path")):
      cli.check_outputs({"--out": out}, {"--template": fasta, "--lengths": None})
  assert fasta.read_text() == ">a\nMKV\n"
  # The inputs given as (label, path) pairs, one label for several paths.
  with pytest.raises(cli.CliError, match="--report's JSON .* would overwrite the config.json"):
    cli.check_outputs({"--out": tmp_path / "x.fasta", "--report's JSON": fasta},
                      [("the config.json", tmp_path / "c.json"), ("the config.json", fasta)])
  cli.check_outputs({"--out": tmp_path / "other.fasta"}, {"--template": fasta})
  with pytest.raises(cli.CliError, match=re.escape(
      f"--report's JSON {fasta} is the same file as --out; choose another output path")):
    cli.check_outputs({"--out": tmp_path / "link.fasta", "--report's JSON": fasta})


def test_check_outputs_keeps_out_of_protected_folders(tmp_path):
  """An output at, inside or hard-linked into a protected folder (a run's checkpoints)."""
  ckpts = tmp_path / "run" / "checkpoints"
  (ckpts / "0" / "ema").mkdir(parents=True)
  (ckpts / "0" / "ema" / "_METADATA").write_text("{}")
  os.link(ckpts / "0" / "ema" / "_METADATA", tmp_path / "linked.json")
  (tmp_path / "alias").symlink_to(tmp_path / "run")
  keep = {"the checkpoints of --workdir": ckpts}
  for out in (ckpts / "0" / "x.fasta", ckpts / "new" / "x.fasta", tmp_path / "alias" /
              "checkpoints" / "x.fasta", tmp_path / "linked.json"):
    with pytest.raises(cli.CliError, match=re.escape(
        f"--out {out} lies inside the checkpoints of --workdir {ckpts}; writing there could "
        "corrupt it: choose an output path outside it")):
      cli.check_outputs({"--out": out}, keep_out=keep)
  cli.check_outputs({"--out": tmp_path / "run" / "samples.fasta"}, keep_out=keep)


def test_check_outputs_refuses_folders_and_what_cannot_be_written(tmp_path):
  """An existing folder, a file where a folder must be, a folder path; nothing is created for a
  path whose parents are missing (the writer creates them)."""
  (tmp_path / "dir").mkdir()
  (tmp_path / "file").write_text("x")
  cases = [({"--out": tmp_path / "dir"}, {}, f"--out {tmp_path / 'dir'} is a folder; give a "
            "file path"),
           ({"--out": tmp_path / "file" / "x.json"}, {},
            f"--out {tmp_path / 'file' / 'x.json'}: {tmp_path / 'file'} is not a folder"),
           ({"--out": f"{tmp_path}/new/"}, {}, f"--out {tmp_path}/new/ is a folder path; give a "
            "file path"),
           ({}, {"--output": tmp_path / "file"}, f"--output {tmp_path / 'file'} exists and is "
            "not a folder")]
  for outputs, folders, match in cases:
    with pytest.raises(cli.CliError, match=re.escape(match)):
      cli.check_outputs(outputs, folders=folders)
  cli.check_outputs({"--out": tmp_path / "a" / "b" / "x.fasta", "--x": tmp_path / "file"},
                    folders={"--output": tmp_path / "dir"})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]  # nothing created


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_check_outputs_tries_the_write():
  """Writability is tried, not read from the mode bits (which root ignores): /proc takes no new
  file and /proc/version no writes, for root as well."""
  with pytest.raises(cli.CliError, match=re.escape("--out /proc/x.fasta: cannot write into "
                                                   "/proc (")):
    cli.check_outputs({"--out": "/proc/x.fasta"})
  with pytest.raises(cli.CliError, match=re.escape("--out /proc/version cannot be written (")):
    cli.check_outputs({"--out": "/proc/version"})
