"""Conditioning builders: fixed tokens and masks for prefix, suffix, infill, motifs, templates."""

import numpy as np
import pytest

from sedd_jax.sampling import conditioning as cond

# ESM-2 ids: L 4, A 5, G 6, V 7, S 8, E 9, K 15, M 20.


def test_prefix_suffix_combine():
  p = cond.prefix("MA", 5)
  np.testing.assert_array_equal(p.tokens, [20, 5, 0, 0, 0])
  np.testing.assert_array_equal(p.mask, [1, 1, 0, 0, 0])
  s = cond.suffix("GK", 5)
  np.testing.assert_array_equal(s.tokens, [0, 0, 0, 6, 15])
  c = cond.combine(p, s)
  np.testing.assert_array_equal(c.mask, [1, 1, 0, 1, 1])
  assert c.describe() == "MA_GK"
  with pytest.raises(ValueError, match="overlap"):
    cond.combine(cond.prefix("MA", 3), cond.suffix("GK", 3))
  with pytest.raises(ValueError, match="longer than the length"):
    cond.prefix("MAGV", 3)
  with pytest.raises(ValueError, match="maximum length 4"):
    cond.prefix("MA", 5, max_length=4)


def test_infill_and_spans():
  c = cond.infill("MAGVSE", [(1, 3), (4, 5)])
  np.testing.assert_array_equal(c.mask, [1, 0, 0, 1, 0, 1])
  np.testing.assert_array_equal(c.tokens, [20, 5, 6, 7, 8, 9])
  assert cond.parse_spans("1:3,4:5") == [(1, 3), (4, 5)]
  with pytest.raises(ValueError, match="overlap"):
    cond.infill("MAGVSE", [(1, 4), (3, 5)])
  with pytest.raises(ValueError, match="outside"):
    cond.infill("MAGVSE", [(4, 9)])
  with pytest.raises(ValueError, match="START:END"):
    cond.parse_spans("1-2-3")


def test_motif_given_and_sampled_positions():
  c = cond.motif([("MA", 1), ("GK", 5)], 8)
  np.testing.assert_array_equal(c.mask, [0, 1, 1, 0, 0, 1, 1, 0])
  assert c.describe() == "_MA__GK_"
  rng = np.random.default_rng(0)
  starts = set()
  for _ in range(50):
    c = cond.motif([("MA", None), ("GK", 2), ("VV", None)], 8, rng=rng)
    assert c.mask.sum() == 6
    assert c.describe()[2:4] == "GK"
    d = c.describe()
    starts.add(d.index("MA"))
    assert "VV" in d
  assert len(starts) > 1  # positions are drawn
  assert cond.parse_motif("MAG@12") == ("MAG", 12)
  assert cond.parse_motif("MAG@?") == ("MAG", None)
  assert cond.parse_motif("MAG") == ("MAG", None)


def test_motif_errors():
  with pytest.raises(ValueError, match="longer than the scaffold"):
    cond.motif([("MAGVSEK", 0)], 5)
  with pytest.raises(ValueError, match="longer than the scaffold"):
    cond.motif([("MAGVSEK", None)], 5, rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match="more than the scaffold"):
    cond.motif([("MAG", None), ("VSE", None)], 5, rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match="overlap"):
    cond.motif([("MAG", 0), ("VSE", 2)], 8)
  with pytest.raises(ValueError, match="runs past"):
    cond.motif([("MAG", 6)], 8)
  with pytest.raises(ValueError, match="maximum length"):
    cond.motif([("MAG", 0)], 200, max_length=128)
  with pytest.raises(ValueError, match="could not place"):
    # Room for 2 + 2 only if MA is not in the middle: fixed at 1, the rest cannot fit.
    cond.motif([("MA", 1), ("GKV", None)], 5, rng=np.random.default_rng(0), max_tries=5)
  with pytest.raises(ValueError, match="position"):
    cond.parse_motif("MAG@x")


def test_template():
  c = cond.template("MA__G<mask>K")
  np.testing.assert_array_equal(c.mask, [1, 1, 0, 0, 1, 0, 1])
  np.testing.assert_array_equal(c.tokens[c.mask], [20, 5, 6, 15])
  c = cond.template("M A\n..G", mask_char=".")
  assert c.describe() == "MA__G"
  with pytest.raises(ValueError, match="maximum length"):
    cond.template("M" * 10, max_length=8)
  with pytest.raises(ValueError, match="invalid character"):
    cond.template("MA#G")
  with pytest.raises(ValueError, match="mask_char"):
    cond.template("MA", mask_char="X")


def test_stack_pads():
  tok, msk = cond.stack([cond.prefix("MA", 3), cond.template("_G")], 4)
  assert tok.shape == (2, 4) and msk.shape == (2, 4)
  np.testing.assert_array_equal(msk, [[1, 1, 0, 0], [0, 1, 0, 0]])


def test_inline_combines_prefix_suffix_and_motifs():
  c = cond.inline(8, prefix="MA", suffix="GK", motifs=["VV@3"])
  assert c.describe() == "MA_VV_GK"
  assert cond.inline(8) is None
  # Motifs as pairs or strings; a drawn start avoids the prefix and the given motif.
  rng = np.random.default_rng(0)
  seen = {cond.inline(9, prefix="MA", motifs=[("VV", 4), "SE"], rng=rng).describe()
          for _ in range(40)}
  assert seen == {"MASEVV___", "MA__VVSE_", "MA__VV_SE"}  # every free start of SE
  with pytest.raises(ValueError, match="length 9 is over the model's maximum length 8"):
    cond.inline(9, prefix="MA", max_length=8)
  with pytest.raises(ValueError, match="^prefix fixes X"):
    cond.inline(6, prefix="MX", allow_rare=False)
  assert cond.inline(6, prefix="MX", allow_rare=True).describe() == "MX____"
  with pytest.raises(ValueError, match="^motifs fixes B, U"):
    cond.inline(6, motifs=["UB@2"], allow_rare=False)


def test_check_residues_names_the_letters_and_positions():
  c = cond.template("MX_Z_", max_length=8)
  cond.check_residues(c, allow_rare=True, what="template")
  with pytest.raises(ValueError) as e:
    cond.check_residues(c, allow_rare=False, what="template", hint="add --allow-rare")
  assert str(e.value) == (
      "template fixes X, Z (0-based positions [1, 3]): only the 20 standard amino acids are "
      "generated unless rare residues are allowed; add --allow-rare or replace them")
