"""The protein-ligand half of python -m sedd_jax.evaluate: per-token losses of the scored
tracks and the flags that do not apply."""

import argparse

import pytest

from sedd_jax import evaluate_protein_ligand as pl_evaluate
from sedd_jax.cli import CliError
from sedd_jax.protein_ligand import modes


def test_fasta_flags_do_not_apply():
  for flags in (dict(fasta="a.fa", baseline_fasta=None), dict(fasta=None, baseline_fasta="b.fa")):
    with pytest.raises(CliError, match="do not apply to protein-ligand checkpoints"):
      pl_evaluate.check_protein_ligand_args(argparse.Namespace(**flags))
  pl_evaluate.check_protein_ligand_args(argparse.Namespace(fasta=None, baseline_fasta=None))


def test_protein_ligand_losses_per_token_of_the_scored_tracks():
  assert tuple(pl_evaluate.SCORED) == modes.MODES
  means = {f"loss/{m}": float(i + 1) for i, m in enumerate(modes.MODES)}
  got = pl_evaluate.per_mode(means, {"protein": 40.0, "ligand": 10.0}, n=2)
  assert got["protein_only"]["loss_per_token"] == 1.0 * 2 / 40
  assert got["ligand_only"]["loss_per_token"] == 2.0 * 2 / 10
  assert got["ligand_given_protein"]["loss_per_token"] == 3.0 * 2 / 10
  assert got["protein_given_ligand"]["loss_per_token"] == 4.0 * 2 / 40
  assert got["joint"]["loss_per_token"] == 2 * 5.0 * 2 / 50  # the mean of the two tracks
  assert got["joint"]["scored_tracks"] == ("protein", "ligand") and got["joint"]["loss"] == 5.0
