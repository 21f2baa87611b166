"""Sample-quality report: every metric against hand-computed values on tiny inputs."""

import json
import math

import numpy as np
import pytest

from sedd_jax.sampling import report


def test_composition_and_kl():
  comp = report.composition(["AAB", "B"])
  assert comp == {"A": 0.5, "B": 0.5}
  assert report.composition(["A"], alphabet="AC") == {"A": 1.0, "C": 0.0}
  # KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 log 2 + 1/2 log(2/3).
  kl = report.kl_divergence({"A": 0.5, "B": 0.5}, {"A": 0.25, "B": 0.75}, alpha=0.0)
  assert kl == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-12)
  assert report.kl_divergence(comp, comp) == pytest.approx(0.0, abs=1e-12)
  # Unseen letters are smoothed, never infinite.
  assert math.isfinite(report.kl_divergence({"A": 1.0}, {"B": 1.0}))


def test_length_stats():
  st = report.length_stats(["A", "AAA", "AA"], bins=2)
  assert st["mean"] == 2.0 and st["min"] == 1 and st["max"] == 3
  assert st["std"] == pytest.approx(math.sqrt(2 / 3))
  assert sum(st["hist"]) == 3


def test_homopolymer_and_low_complexity():
  assert report.homopolymer_runs("AAAAABCCCCCCD", 5) == [(0, 5), (6, 6)]
  assert report.homopolymer_runs("AAAAAB", 5) == [(0, 5)]
  assert report.homopolymer_runs("AAAAB", 5) == []
  lc = report.low_complexity(["AAAAAB", "ABCDEF"], run_length=5, window=2)
  assert lc["frac_seqs_with_homopolymer"] == 0.5
  assert lc["frac_residues_in_homopolymer"] == pytest.approx(5 / 12)
  # Windows of 2: "AAAAAB" -> 0,0,0,0,1 bits; "ABCDEF" -> five windows of 1 bit.
  assert lc["mean_window_entropy_bits"] == pytest.approx(6 / 10)
  assert lc["frac_low_entropy_windows"] == 1.0  # every window is below 2.2 bits
  lc = report.low_complexity(["AAAAAB", "ABCDEF"], run_length=5, window=2, entropy_threshold=0.5)
  assert lc["frac_low_entropy_windows"] == pytest.approx(4 / 10)


def test_window_entropy():
  np.testing.assert_allclose(report.window_entropies("ABCD", 4), [2.0])
  np.testing.assert_allclose(report.window_entropies("AABB", 2), [0.0, 1.0, 0.0])
  np.testing.assert_allclose(report.window_entropies("AB", 12), [1.0])  # shorter than window


def test_write_report(tmp_path):
  samples = ["ACDEFGHIKL", "AAAAAAAKLM", "MKVLAAGG"]
  data = ["ACDEFGHIKLMN", "MKVLAAGGST", "PQRSTVWY"]
  rep = report.write_report(samples, data, tmp_path / "r.json", tmp_path / "r.png")
  loaded = json.loads((tmp_path / "r.json").read_text())
  assert loaded["num_samples"] == 3
  assert loaded["low_complexity"]["samples"]["frac_seqs_with_homopolymer"] == pytest.approx(1 / 3)
  assert loaded["novelty"]["nearest_jaccard"][0] == pytest.approx(
      rep["novelty"]["nearest_jaccard"][0])
  # "ACDEFGHIKL" is in "ACDEFGHIKLMN", "MKVLAAGG" in "MKVLAAGGST": identity 1.
  assert loaded["novelty"]["nearest_identity"][0] == 1.0
  assert loaded["novelty"]["nearest_identity"][2] == 1.0
  assert loaded["novelty"]["frac_nearest_identity_over_0.9"] >= 2 / 3
  assert 0 <= loaded["diversity"]["mean_pairwise_aligned_identity"] <= 1
  assert loaded["low_complexity"]["samples"]["frac_low_complexity_seqs"] == pytest.approx(1 / 3)
  assert (tmp_path / "r.png").stat().st_size > 1000


def test_tandem_repeats_and_low_complexity_samples():
  np.testing.assert_array_equal(report.tandem_repeat_mask("MEKEKEKEKAL"),
                                [0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(report.tandem_repeat_mask("ABCABCABCX"), [1] * 9 + [0])
  assert not report.tandem_repeat_mask("ABCABCX").any()  # two copies only
  assert not report.tandem_repeat_mask("MKVLAAGGSTEEKKQRST").any()
  natural = "MKVLAAGGSTEEKKQRSTVWYPHDNCFIM"
  assert not report.low_complexity_mask(natural).any()
  # 12 of 24 residues are a tandem repeat (EK x 6): at lc_fraction 0.3 a low-complexity sample.
  repeat = "MKVLAGSTWYPD" + "EK" * 6
  lc = report.low_complexity_mask(repeat)
  assert lc[12:].all()
  stats = report.low_complexity([natural, repeat, "QQQQQQQQQQ"], lc_fraction=0.3)
  assert stats["frac_low_complexity_seqs"] == pytest.approx(2 / 3)
  total = len(natural) + len(repeat) + 10
  assert stats["frac_residues_low_complexity"] == pytest.approx((lc.sum() + 10) / total)


def test_length_panel_shows_samples_of_one_length():
  """All samples of one length (the usual case): a marker at that length, visible next to the
  data's histogram (fractions of sequences per shared bin); otherwise two histograms."""
  from matplotlib.figure import Figure

  data = ["A" * n for n in (50, 60, 60, 70, 80, 90, 100, 120)]
  ax = Figure().subplots()
  report.plot_lengths(ax, ["M" * 64] * 5, data, bins=7)
  markers = [ln for ln in ax.lines if ln.get_label().startswith("samples")]
  assert len(markers) == 1 and markers[0].get_xdata()[0] == 64
  assert markers[0].get_label() == "samples: length 64 (5 of 5)"
  lo, hi = ax.get_xlim()
  assert lo <= 50 and 64 < hi and hi >= 120
  heights = [p.get_height() for p in ax.patches]
  assert len(heights) == 7 and sum(heights) == pytest.approx(1.0)
  # Bins of width 10 from 50: 50-60 holds one, 60-70 two, then one each (last bin closed).
  np.testing.assert_allclose(heights, np.array([1, 2, 1, 1, 1, 1, 1]) / 8)
  assert ax.get_ylim()[1] < 2 * max(heights)  # the data's bars are not squashed
  ax = Figure().subplots()
  report.plot_lengths(ax, ["M" * n for n in (55, 65, 75, 85)], data, bins=7, max_marked=3)
  assert not ax.lines and len(ax.patches) == 14
  ax = Figure().subplots()  # the model's length: 2 of the 8 data sequences are longer than 95
  report.plot_lengths(ax, ["M" * 64] * 5, data, bins=7, max_length=95)
  cap = [ln for ln in ax.lines if ln.get_label().startswith("model length")]
  assert len(cap) == 1 and cap[0].get_xdata()[0] == 95
  assert cap[0].get_label() == "model length 95 (25.0% of data longer)"
  assert ax.get_title().endswith("samples capped at 95")


def test_a_report_from_the_data_composition_alone(tmp_path):
  """Without data sequences (a bundle's counts only): the composition and KL against the given
  composition, novelty null with the missing input named, the PNG still written."""
  counts = {"A": 6, "K": 2, "M": 0, "L": 0}
  comp = report.composition_from_counts(counts)
  assert comp == report.composition(["AAAK", "AAAK"]) == {"A": 0.75, "K": 0.25}
  assert report.composition_from_counts(counts, "AKM") == {"A": 0.75, "K": 0.25, "M": 0.0}
  samples = ["AAKK", "AK"]  # A 1/2, K 1/2
  rep = report.write_report(samples, [], tmp_path / "r.json", tmp_path / "r.png",
                            data_composition=comp, missing="no prepared training data at P")
  assert rep["composition"]["data"] == comp
  kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
  assert rep["composition"]["kl_samples_data_nats"] == pytest.approx(kl, abs=1e-5)
  loaded = json.loads((tmp_path / "r.json").read_text())
  assert loaded["novelty"] is None and loaded["num_reference"] == 0
  assert loaded["missing"] == ("novelty needs the reference sequences: no prepared training "
                               "data at P")
  assert (tmp_path / "r.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="give data sequences or data_composition, not both"):
    report.quality_report(samples, ["AK"], data_composition=comp)
