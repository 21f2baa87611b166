"""Sequence similarity: k-mer diversity, ungapped and aligned identity, nearest-reference
Jaccard and identity, against hand-computed values on tiny inputs."""

import math

import numpy as np
import pytest

from sedd_jax.sampling import similarity


def test_diversity():
  # 2-mers of "ABAB": AB, BA, AB -> 2 distinct of 3; with "AB": 2 distinct of 4.
  assert similarity.distinct_kmer_ratio(["ABAB"], 2) == pytest.approx(2 / 3)
  assert similarity.distinct_kmer_ratio(["ABAB", "AB"], 2) == pytest.approx(2 / 4)
  assert similarity.identity("ABCD", "ABXD") == 0.75
  assert similarity.identity("ABC", "AB") == 1.0
  # Pairs: (ABCD, ABXD) 0.75, (ABCD, XXXX) 0, (ABXD, XXXX) 0.25 -> mean 1/3.
  assert similarity.mean_pairwise_identity(["ABCD", "ABXD", "XXXX"]) == pytest.approx(1 / 3)
  assert similarity.mean_pairwise_identity(["ABCD", "AB"]) == pytest.approx(1.0)


def test_novelty():
  # 2-mers: "ABC" -> {AB, BC}; "ABD" -> {AB, BD}: Jaccard 1/3; "ABC" itself: 1.
  near = similarity.nearest_jaccard(["ABC", "XYZ"], ["ABD", "ABCA"], k=2)
  # "ABCA" -> {AB, BC, CA}: Jaccard with {AB, BC} = 2/3.
  np.testing.assert_allclose(near, [2 / 3, 0.0])
  np.testing.assert_allclose(similarity.nearest_jaccard(["ABC"], ["ABC"], k=2), [1.0])


def test_aligned_identity():
  # One deletion: 7 identical aligned residues / shorter length 7.
  assert similarity.aligned_identity("MKVLAAGG", "MKVAAGG") == 1.0
  # End gaps are free: a sequence inside a longer one is identical over its length.
  assert similarity.aligned_identity("WWWMKVLAAGGWWW", "MKVLAAGG") == 1.0
  # A shift defeats the ungapped identity, not the alignment.
  assert similarity.identity("AMKVLAAGGST", "MKVLAAGGST") < 0.3
  assert similarity.aligned_identity("AMKVLAAGGST", "MKVLAAGGST") == 1.0
  # One substitution in 10.
  assert similarity.aligned_identity("MKVLAAGGST", "MKVLWAGGST") == pytest.approx(0.9)
  assert math.isnan(similarity.aligned_identity("", "MK"))
  # A score over 32767 (16-bit parasail saturates and reports 0 matches) takes 32 bits.
  long = "WWWWCCCCMK" * 400
  assert similarity.aligned_identity(long, long[10:]) == 1.0
  # Pairs: (a, b) 1.0, (a, c) and (b, c) by hand below.
  a, b, c = "MKVLAAGGST", "MKVLAAGGST", "PQRSTVWYHD"
  want = (1.0 + 2 * similarity.aligned_identity(a, c)) / 3
  assert similarity.mean_pairwise_aligned_identity([a, b, c]) == pytest.approx(want)
  assert similarity.aligned_identity(a, c) < 0.5


def test_nearest_aligned_identity():
  ref = ["PQRSTVWYHDPQRS", "AMKVLAAGGSTEEK", "GGGGSGGGGS"]
  near = similarity.nearest_aligned_identity(["MKVLAAGGSTEEK", "MKVLWAGGSTEEK"], ref, k=2,
                                         candidates=3)
  np.testing.assert_allclose(near, [1.0, 12 / 13])
  # With one candidate the k-mer prefilter picks the right reference here too.
  np.testing.assert_allclose(similarity.nearest_aligned_identity(["MKVLWAGGSTEEK"], ref, k=2,
                                                             candidates=1), [12 / 13])
  np.testing.assert_allclose(similarity.nearest_aligned_identity(["MK"], []), [0.0])
