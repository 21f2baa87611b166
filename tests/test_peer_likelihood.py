"""benchmarks/peer_likelihood.py's arithmetic (issue 34): the per-residue bound with its ratio
estimator SE over sequences, and the residues sedd_jax trained from its train rows."""

import importlib.util
import math

import numpy as np
import pytest

from helpers import ROOT

# loaded from its file: benchmarks/ is no package
_spec = importlib.util.spec_from_file_location("peer_likelihood",
                                               ROOT / "benchmarks" / "peer_likelihood.py")
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)


def test_ratio_se_closed_form():
  # R = 15 / 6; residuals v - R D = (-0.5, -1, 1.5), squares sum 3.5; SE = sqrt(3/2 * 3.5) / 6
  r, se = peer.ratio_se(np.array([2.0, 4.0, 9.0]), np.array([1, 2, 3]))
  assert r == 2.5
  assert se == pytest.approx(math.sqrt(5.25) / 6, rel=1e-12)
  assert peer.ratio_se(np.array([3.0, 6.0]), np.array([1, 2]))[1] == 0.0  # same rate: no spread
  with pytest.raises(ValueError, match=r"shapes \(3,\) and \(2,\)"):
    peer.ratio_se(np.ones(3), np.ones(2))


def test_residues_at_steps_weights_each_window_by_its_real_fraction():
  rows = [{"kind": "train", "step": 100, "tokens_per_s": 2000.0, "real_tokens_per_s": 2000.0},
          {"kind": "eval", "step": 100},
          {"kind": "train", "step": 50, "tokens_per_s": 1000.0, "real_tokens_per_s": 500.0},
          {"kind": "train", "step": 100, "tokens_per_s": 1.0, "real_tokens_per_s": 0.0}]
  # steps 1..50 at half real (50 x 8 x 0.5 = 200), 51..100 all real (+400); the repeated row
  # of step 100 is skipped
  assert peer.residues_at_steps(rows, tokens_per_step=8) == {50: 200.0, 100: 600.0}
