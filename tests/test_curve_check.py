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


# A job of `run_all`, standing in for the reference: its one logged point is 1 when it ran
# without memory preallocation (a shared GPU), else 0, and it records when it ran.
_FAKE_JOB = """
import json, os, sys, time
t0 = time.time()
time.sleep(1.0)
shared = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE") == "false"
print(json.dumps({"impl": "torch-ref", "step": 100, "loss_per_token": float(shared),
                  "gpu": os.environ["CUDA_VISIBLE_DEVICES"], "t0": t0, "t1": time.time()}))
"""


@pytest.mark.parametrize("gpus,shared", [("7,7", True), ("6,7", False), ("7", False)])
def test_jobs_share_a_gpu_named_twice(tmp_path, monkeypatch, gpus, shared):
  jobs = [(f"ref_seed{i}", [curve_check.sys.executable, "-c", _FAKE_JOB], {}) for i in range(2)]
  monkeypatch.setattr(curve_check, "jobs", lambda args: list(jobs))
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  args = curve_check.argparse.Namespace(root=str(tmp_path), gpus=gpus, timeout=60)
  curves = curve_check.run_all(args)
  assert curves == {f"ref_seed{i}": {100: float(shared)} for i in range(2)}
  rows = [next(curve_check.json.loads(line) for line in (tmp_path / f"ref_seed{i}.log")
               .read_text().splitlines() if line.startswith("{")) for i in range(2)]
  assert sorted(r["gpu"] for r in rows) == sorted(gpus.split(",") * (2 // len(gpus.split(","))))
  overlap = min(r["t1"] for r in rows) > max(r["t0"] for r in rows)
  assert overlap == (len(gpus.split(",")) == 2)  # two slots run at once, one slot in turn
