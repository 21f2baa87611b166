"""benchmarks/curve_check.py's rule for a speed option's training curve (issue 17): a run is on
the reference's curve when its tail mean is within 2 standard errors of the reference seeds'."""

import importlib.util

import pytest

from helpers import ROOT

# loaded from its file: benchmarks/ is no package, and on sys.path its attention.py, sampling.py
# ... would shadow nothing today but could tomorrow
_spec = importlib.util.spec_from_file_location("curve_check", ROOT / "benchmarks" / "curve_check.py")
curve_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(curve_check)


def curve(tail_offset: float, head: float = 3.0) -> dict[int, float]:
  """15 logged steps (100 .. 1500); the last third (1100 .. 1500) at 2.85 + tail_offset."""
  return {s: (2.85 + tail_offset if s > 1000 else head) for s in range(100, 1501, 100)}


def test_tolerance_is_two_standard_errors_of_the_seeds_spread():
  # seeds +-0.01 at every tail step: per-step variance (ddof 1) 2e-4, sd 0.0141421; 5 tail
  # steps, 2 seeds: standard error sd * sqrt(1/5 + 1/10) = 0.0077460, tolerance 0.0154919
  curves = {"ref_seed0": curve(0.01), "ref_seed1": curve(-0.01), "default": curve(0.0),
            "inside": curve(0.0154), "outside": curve(-0.0156)}
  rows = curve_check.compare(curves)
  assert curve_check.tail_steps(curves["default"]) == [1100, 1200, 1300, 1400, 1500]
  assert rows["default"]["tolerance"] == pytest.approx(0.0155, abs=1e-4)
  assert rows["ref_seed0"]["on_reference"] is None
  assert rows["inside"]["on_reference"] is True and rows["inside"]["vs_reference"] == 0.0154
  assert rows["outside"]["on_reference"] is False
  assert rows["outside"]["vs_default"] == -0.0156 and rows["default"]["vs_default"] is None


def test_without_two_seeds_there_is_no_verdict():
  rows = curve_check.compare({"ref_seed0": curve(0.0), "hash": curve(0.002)})
  assert rows["hash"]["on_reference"] is None and rows["hash"]["vs_default"] is None
