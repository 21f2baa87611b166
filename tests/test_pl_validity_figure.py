"""scripts/pl_validity_figure.py: pooling of validity reports by sampler setting, and the
summary -> PNG round trip."""

import importlib.util
import json

import pytest

from helpers import ROOT

_spec = importlib.util.spec_from_file_location("pl_validity_figure",
                                               ROOT / "scripts" / "pl_validity_figure.py")
figure = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figure)


def _report(path, *, seed, temperature, valid, order="random", guidance=1.0,
            task="ligand_given_protein", reference="CCO"):
  """A sample.py validity report: one sample per entry of `valid`; the valid ones are the
  reference ligand when their index is even."""
  samples = [{"smiles": reference if ok and i % 2 == 0 else f"C{i}", "valid": ok,
              "reference": reference} for i, ok in enumerate(valid)]
  path.write_text(json.dumps({"task": task, "seed": seed, "temperature": temperature,
                              "reveal_order": order, "guidance": guidance,
                              "samples": samples}))


@pytest.fixture
def run(tmp_path):
  rows = [{"kind": "eval", "step": 0, "valid_loss/ligand_given_protein": 150.0},
          {"kind": "train", "step": 500, "loss": 3.0},
          {"kind": "eval", "step": 1000, "valid_loss/ligand_given_protein": 40.0},
          {"kind": "sample", "step": 1000, "smiles_validity": 0.25}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  _report(tmp_path / "ligands_t0.3.validity.json", seed=0, temperature=0.3,
          valid=[True, True, False, True])
  _report(tmp_path / "ligands_w1.validity.json", seed=0, temperature=1.0, valid=[False, True])
  _report(tmp_path / "pairs.validity.json", seed=0, temperature=1.0, valid=[True], task="joint")
  more = tmp_path / "more"
  more.mkdir()
  _report(more / "t03_s1.validity.json", seed=1, temperature=0.3, valid=[False, False, True])
  _report(more / "c03.validity.json", seed=0, temperature=0.3, valid=[True], order="confidence")
  return tmp_path


def test_reports_of_one_setting_are_pooled_over_seeds(run):
  summary = figure.summarize(run, sorted((run / "more").glob("*.json")))
  assert summary["curve"] == [{"step": 0, "valid_loss": 150.0, "validity": None},
                              {"step": 1000, "valid_loss": 40.0, "validity": 0.25}]
  by_key = {(e["reveal_order"], e["temperature"]): e for e in summary["settings"]}
  assert set(by_key) == {("random", 0.3), ("random", 1.0), ("confidence", 0.3)}  # no joint
  pooled = by_key["random", 0.3]
  assert (pooled["valid"], pooled["num"], sorted(pooled["seeds"])) == (4, 7, [0, 1])
  # the valid samples at even indices are the reference: index 0 of seed 0, index 2 of seed 1
  assert pooled["reference_match"] == 1 + 1
  assert (by_key["random", 1.0]["valid"], by_key["random", 1.0]["num"]) == (1, 2)


def test_a_seed_counted_twice_is_an_error(run, tmp_path):
  dup = tmp_path / "dup.validity.json"
  _report(dup, seed=0, temperature=0.3, valid=[True])
  with pytest.raises(ValueError, match="dup.validity.json: seed 0"):
    figure.summarize(run, [dup])


def test_the_summary_json_redraws_the_figure(run, tmp_path):
  summary_path, png = tmp_path / "s.json", tmp_path / "a.png"
  figure.main([str(run), "--summary", str(summary_path), "--png", str(png)])
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads(summary_path.read_text()) == figure.summarize(run, [])
  png2 = tmp_path / "b.png"
  figure.main(["--from-summary", str(summary_path), "--png", str(png2)])
  assert png2.stat().st_size > 10_000
  with pytest.raises(SystemExit):
    figure.main([str(run), "--from-summary", str(summary_path), "--png", str(png2)])
