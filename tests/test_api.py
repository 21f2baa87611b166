"""The public API (sedd_jax.load and the model's verbs): samples that do not depend on the batch
size, conditioning from plain strings, the closed-form scores of a uniform model, provenance,
and errors naming the argument."""

import json
import math
import sys

import numpy as np
import pytest
from flax import nnx

from helpers import FAST, PAIRS, MICRO_MODEL, load_config, sample_config, save_checkpoint
import sedd_jax
from sedd_jax import config as config_lib
from sedd_jax.data import pipeline
from sedd_jax.data import tokenizers
from sedd_jax.sampling import sampler

STANDARD = set(tokenizers.STANDARD_RESIDUES)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """A loaded tiny run (one block, length 48, 6 sampling steps) whose output weights are zero
  as initialised: with scale_by_sigma its score is uniform over the 32 non-mask tokens, so the
  negative ELBO per residue is log(32) (1 - e^-sigma(1)) in closed form."""
  tmp = tmp_path_factory.mktemp("api")
  cfg = sample_config(tmp)
  pipeline.ensure_prepared(cfg)
  m = sedd_jax.load(save_checkpoint(tmp / "run", cfg, random_output=False))
  m.compiler_options = FAST
  return m


def test_package_import_is_light_and_names_the_api():
  import subprocess
  code = ("import sys, sedd_jax; assert 'jax' not in sys.modules, 'jax imported'; "
          "print(sedd_jax.__version__); assert sedd_jax.load.__module__ == 'sedd_jax.api'")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  from importlib import metadata
  assert out.stdout.strip() == metadata.version("sedd_jax")
  assert {"load", "SeddModel", "ProteinLigandModel", "__version__"} <= set(sedd_jax.__all__)


def test_load_records_the_source_and_refuses_bad_input(model, tmp_path):
  src = model.source
  assert src["kind"] == "run" and src["step"] == 0 and src["weights"] == "ema"
  assert src["checkpoint"].endswith("run/checkpoints/0") and model.max_length == 48
  assert isinstance(model, sedd_jax.SeddModel) and model.step == 0
  with pytest.raises(ValueError, match=r"^weights must be one of \('ema', 'raw'\); got 'params'"):
    sedd_jax.load(src["path"], weights="params")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sedd_jax.load(tmp_path / "none")
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    sedd_jax.load(tmp_path)
  raw = sedd_jax.load(src["checkpoint"], weights="raw")  # a checkpoint folder
  assert raw.source["kind"] == "checkpoint" and raw.weights == "raw"


def test_samples_do_not_depend_on_the_batch_size(model, monkeypatch):
  """One key per sequence: batch sizes 2 and 5 give the same sequences (mixed lengths, a
  prefix, a motif at a drawn position); a repeated call reuses the compiled sampler."""
  kw = dict(lengths=[5, 12, 9, 12, 3], prefix="MK", motifs=["W"], seed=3)
  a = model.sample(5, batch_size=2, **kw)
  b = model.sample(5, batch_size=5, **kw)
  assert isinstance(a, sedd_jax.Samples) and isinstance(a, list)
  assert list(a) == list(b) and len(set(a)) == 5
  assert [len(s) for s in a] == kw["lengths"]
  p = a.provenance
  for s, c in zip(a, p["conditions"]):
    assert set(s) <= STANDARD and s.startswith("MK"[:len(s)])
    assert c.count("W") == 1 and s[c.index("W")] == "W"  # the drawn motif position
  assert p["seed"] == 3 and p["batch_size"] == 2 and p["lengths"] == kw["lengths"]
  assert p["sampler"] == {"predictor": "analytic", "steps": 6, "eps": 1e-5, "temperature": 1.0,
                          "remask": 0.0, "draw": "unbiased", "reveal_order": "random",
                          "cached": False, "allow_rare": False}
  assert p["source"] == model.source and p["sedd_jax_version"] == sedd_jax.__version__
  json.dumps(p)  # JSON-able
  traces = []
  real = sampler.sample
  monkeypatch.setattr(sampler, "sample", lambda *a, **k: traces.append(1) or real(*a, **k))
  assert list(model.sample(5, batch_size=5, **kw)) == list(b) and not traces  # compiled once
  assert list(model.sample(5, batch_size=5, **{**kw, "seed": 4})) != list(b)


def test_templates_and_infill_from_plain_strings(model):
  """Template and infill records are padded for the caller; fixed letters are kept (the batch
  shape of the test above: its compiled sampler is reused)."""
  t = model.sample(5, template="MK__LL<mask>A__HK", batch_size=5, seed=0)
  for s in t:
    assert len(s) == 12 and s[:2] == "MK" and s[4:6] == "LL" and s[7] == "A" and s[10:] == "HK"
  assert t.provenance["conditions"][0] == "MK__LL_A__HK"
  wt = "MKVLLAAGGHHK"
  f = model.sample(5, infill=(wt, "3:6"), batch_size=5, seed=0)
  assert all(s[:3] + s[6:] == wt[:3] + wt[6:] and set(s) <= STANDARD for s in f)
  assert len({s[3:6] for s in f}) > 1


def test_errors_name_the_argument(model, tmp_path):
  cases = [
      (dict(length=49), "^length 49 is over the model's maximum length 48 (cfg.model.length)"),
      (dict(lengths=[10, 60]), "^lengths[1] 60 is over the model's maximum length 48"),
      (dict(lengths=[10, 12], num=3), "^num 3 differs from the 2 lengths given"),
      (dict(lengths="all"), "^lengths must be a list of integers or 'from-data'; got 'all'"),
      (dict(template="M" * 49), "^template length 49 is over the model's maximum length 48"),
      (dict(template=["MK__", "M" * 50]), "^template[1]: template length 50 is over"),
      (dict(infill=("M" * 49, "1:3")), "^infill sequence length 49 is over the model's maximum"),
      (dict(infill=("MKV", "5:7")), "^infill: span [5, 7) is empty or outside"),
      (dict(prefix="MKX", length=10), "^prefix fixes X (0-based positions [2]): only the 20 "
                                      "standard amino acids are generated unless rare residues "
                                      "are allowed; pass allow_rare=True or replace them"),
      (dict(prefix="M" * 11, length=10), "^prefix of 11 residues is longer than the length 10"),
      (dict(motifs=["WW@9"], length=10), "^motif 'WW' at 9 runs past the scaffold end 10"),
      (dict(template="MK__", prefix="M"), "^template, infill and prefix/suffix/motifs exclude"),
      (dict(template="MK__", length=4), "^template sets the lengths; drop length/lengths"),
      (dict(predictor="ddim"), "^predictor 'ddim' is not a predictor"),
      (dict(steps=0), "^steps must be >= 1; got 0"),
      (dict(temperature=0.0), "^temperature must be a finite number > 0"),
      (dict(batch_size=0), "^batch_size must be >= 1; got 0"),
      (dict(seed=1.5), "^seed must be an integer; got 1.5"),
      (dict(motifs="WW@3"), "^motifs must be a list of 'SEQ@POS' strings or (SEQ, POS) pairs"),
      (dict(prefix="MK1", length=8), "^prefix/suffix/motifs: invalid character '1' (0x31) at "
                                     "column 3 of sequence 'prefix'"),
  ]
  for kw, match in cases:
    with pytest.raises(ValueError, match=re_escape(match)):
      model.sample(**kw)
  with pytest.raises(ValueError, match=re_escape("seqs[0] has length 49 > max_length 48")):
    model.score(["M" * 49])
  with pytest.raises(ValueError, match="^seqs must be a sequence of sequences"):
    model.score("MKV")
  with pytest.raises(ValueError, match=re_escape("mutation 'A1G' (mutations[0]): the wild type "
                                                 "has 'M' at position 1, not 'A'")):
    model.score_mutations("MKV", ["A1G"])
  # Without the training data, drawn lengths say what is missing.
  cfg = sample_config(tmp_path)  # data never prepared
  bare = sedd_jax.load(save_checkpoint(tmp_path / "run", cfg))
  assert bare.data_stats() is None
  with pytest.raises(ValueError, match=re_escape(
      "lengths='from-data': drawing the protein lengths needs the training data's lengths: no "
      f"prepared data at {cfg.data.prepared} (cfg.data.prepared) and no data_stats.json in ")):
    bare.sample(3, lengths="from-data")


def re_escape(match: str) -> str:
  """`match` as a regex: escaped, a leading '^' kept."""
  import re
  return ("^" + re.escape(match[1:])) if match.startswith("^") else re.escape(match)


def test_score_is_the_closed_form_of_a_uniform_model(model):
  seqs = ["MKVLLAAGGHHK", "WWPLKVAA", "A" * 30, "MKT"]
  r = model.score(seqs, num_samples=16, seed=1)
  expected = math.log(32) * (1 - math.exp(-float(model.noise.total_noise(1.0))))
  np.testing.assert_array_equal(r.length, [12, 8, 30, 3])
  assert r.nelbo.shape == r.nelbo_se.shape == r.per_residue_se.shape == (4,)
  np.testing.assert_allclose(r.per_residue, r.nelbo / r.length, rtol=1e-12)
  total = r.nelbo.sum() / r.length.sum()
  assert abs(total - expected) < 4 * r.total_se / r.length.sum() + 1e-3, (total, expected)
  assert r.provenance["call"] == "score" and r.provenance["num_samples"] == 16
  assert r.provenance["source"]["step"] == 0


def test_mutation_effects_of_a_uniform_model_are_zero(model):
  """The uniform model gives every sequence the same likelihood: delta 0 (to float rounding)
  with common random numbers, exactly 0 by masked marginals."""
  muts = ["M1A", "K2R:V3L", "V3V"]
  r = model.score_mutations("MKVLLAAGGHHK", muts, num_samples=8)
  assert r.mutations == muts and r.delta.shape == r.se.shape == (3,)
  np.testing.assert_allclose(r.delta, 0.0, atol=1e-3)
  mm = model.score_mutations("MKVLLAAGGHHK", muts, method="masked_marginal")
  np.testing.assert_allclose(mm.delta, 0.0, atol=1e-5)
  assert mm.provenance["call"] == "score_mutations" and mm.provenance["num"] == 3
  assert mm.provenance["method"] == "masked_marginal"


def test_embed_gives_per_residue_states_and_their_mean(model):
  seqs = ["MKVLLAAGGHHK", "WWP"]
  e = model.embed(seqs)
  assert [x.shape for x in e.per_residue] == [(12, 32), (3, 32)]
  np.testing.assert_allclose(e.mean, np.stack([x.mean(0) for x in e.per_residue]), rtol=1e-5)
  assert e.provenance["layer"] == -1 and e.provenance["t"] == 0.0
  assert np.isfinite(e.mean).all() and not np.allclose(e.per_residue[0][0], e.per_residue[0][1])


# ---- protein-ligand ----


@pytest.fixture(scope="module")
def pl_model(tmp_path_factory):
  """A loaded protein-ligand run on the bundled pairs (one block of width 32, proteins of 64,
  ligands of 48 tokens), its output weights zero: a uniform score over each track's tokens."""
  from sedd_jax.protein_ligand import model as pl_lib
  from sedd_jax.training import checkpoint as ckpt_lib

  tmp = tmp_path_factory.mktemp("api_pl")
  cfg = config_lib.apply_overrides(load_config("protein_ligand.py:tiny", {
      **MICRO_MODEL, "model.n_blocks": 1, "model.length": 64, "ligand.length": 48,
      "sampling.steps": 4}), {"data.fasta": str(PAIRS), "data.prepared": str(tmp / "store")})
  pipeline.ensure_prepared(cfg)
  model = pl_lib.build_model(cfg, nnx.Rngs(0))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  ckpt_lib.save_inference_checkpoint(tmp / "run" / "checkpoints" / "2", params, cfg)
  return sedd_jax.load(tmp / "run")


def test_protein_ligand_ligands_scores_and_errors(pl_model):
  m = pl_model
  assert isinstance(m, sedd_jax.ProteinLigandModel) and m.step == 2 and m.ligand_length == 48
  ligs = m.sample_ligands(["MKVLLAAGGH", "WWKKLLPP"], num_per_protein=2, ligand_length=6,
                          seed=0, batch_size=4)
  assert len(ligs) == 4 and ligs.provenance["given"] == [0, 0, 1, 1]
  for s in ligs:  # six SMILES tokens, none of them special
    ids = m.smiles_tokenizer.encode(s)
    assert ids.size == 6 and (ids >= 4).all()
  assert ligs.provenance["ligand_lengths"] == [6] * 4
  assert ligs.provenance["sampler"]["steps"] == 4 and ligs.provenance["guidance"] == 1.0
  r = m.score_pairs(["MKVLLAAGGH", "WWKKLLPP", "MKV"], ["CCO", "c1ccccc1", "CC(=O)O"],
                    num_samples=8, batch_size=2)
  np.testing.assert_array_equal(r.length, [3, 8, 7])  # c 1 c c c c c 1; C C ( = O ) O
  tokens = m.ligand_graph.tokens
  expected = math.log(tokens) * (1 - math.exp(-float(m.noise.total_noise(1.0))))
  np.testing.assert_allclose(r.per_token, r.nelbo / r.length, rtol=1e-12)
  per_token = r.nelbo.sum() / r.length.sum()
  assert abs(per_token - expected) < 4 * np.sqrt((r.nelbo_se ** 2).sum()) / r.length.sum(), (
      per_token, expected)
  assert r.provenance["call"] == "score_pairs"
  for call, match in (
      (lambda: m.sample_ligands(["M" * 65]), "proteins[0] has 65 tokens; the model takes 1..64"),
      (lambda: m.sample_ligands("MKV"), "proteins must be a list of strings; got str"),
      (lambda: m.sample_ligands(["MKV"], ligand_length=49), "ligand_length 49 must lie in"),
      (lambda: m.sample_proteins(["C?C"]), "smiles[0]: SMILES token '?' is not in the vocabulary"),
      (lambda: m.score_pairs(["MKV"], ["CC", "CO"]), "proteins and smiles must pair up"),
      (lambda: m.sample_pairs(0), "num must be >= 1; got 0"),
      (lambda: m.sample_ligands(["MKV", "WW"], ligand_length=[3]),
       "ligand_length must give one length per sample (2); got 1"),
      (lambda: m.sample_ligands(["MKV", "WW"], ligand_length=[3, 49]),
       "ligand_length[1] 49 must lie in [1, 48]"),
      (lambda: m.sample_pairs(2, length=[3, 0]), "length[1] must be >= 1; got 0")):
    with pytest.raises(ValueError, match=re_escape(match)):
      call()


def test_protein_ligand_proteins_and_pairs(pl_model):
  m = pl_model
  prots = m.sample_proteins(["CCO", "c1ccccc1"], length=7, seed=1, batch_size=2)
  assert [len(s) for s in prots] == [7, 7] and all(set(s) <= STANDARD for s in prots)
  assert prots.provenance["given"] == [0, 1] and prots.provenance["call"] == "sample_proteins"
  pairs = m.sample_pairs(3, length=5, ligand_length=4, seed=2)
  assert len(pairs) == 3 and pairs.provenance["ligand_lengths"] == [4, 4, 4]
  for protein, smiles in pairs:
    assert len(protein) == 5 and set(protein) <= STANDARD
    ids = m.smiles_tokenizer.encode(smiles)
    assert ids.size == 4 and (ids >= 4).all()
  each = m.sample_pairs(3, length=[5, 2, 9], ligand_length=np.array([4, 1, 7]), seed=2)
  assert [len(p) for p, _ in each] == [5, 2, 9]  # one length per pair (issue 31)
  assert [m.smiles_tokenizer.encode(x).size for _, x in each] == [4, 1, 7]
  assert each.provenance["lengths"] == [5, 2, 9] and each.provenance["ligand_lengths"] == [4, 1, 7]
  prots = m.sample_proteins(["CCO", "c1ccccc1"], num_per_ligand=2, length=[7, 3, 5, 1], seed=1,
                            batch_size=2)
  assert [len(s) for s in prots] == [7, 3, 5, 1] and prots.provenance["given"] == [0, 0, 1, 1]
  drawn = m.sample_pairs(3, seed=2)  # lengths from the training histograms (same program)
  for track, key, top in (("protein", "lengths", 64), ("ligand", "ligand_lengths", 48)):
    support = np.minimum(m.data_stats().tracks[track].length_values, top)
    assert set(drawn.provenance[key]) <= set(support.tolist())
    assert [len(p if track == "protein" else m.smiles_tokenizer.encode(s))
            for p, s in drawn] == drawn.provenance[key]
