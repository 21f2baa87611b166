"""Metrics: progress line, JSONL rows, loss-curve PNG, wandb modes (never online)."""

import builtins
import json
import logging

import pytest

from helpers import load_config
from sedd_jax.training import metrics as metrics_lib



def _cfg(mode="disabled"):
  return load_config(overrides={"wandb.mode": mode})


def test_format_duration():
  assert metrics_lib.format_duration(5) == "5s"
  assert metrics_lib.format_duration(125) == "2m05s"
  assert metrics_lib.format_duration(3725) == "1h02m"
  assert metrics_lib.format_duration(float("nan")) == "?"


def test_progress_line_fields():
  line = metrics_lib.progress_line(200, 600, {
    "loss": 41.27, "loss_per_token": 2.95, "lr": 2e-3, "grad_norm": 3.1, "tokens_per_s": 12345,
    "step_time": 0.21, "eta_s": 84, "skipped": 0})
  for part in ("step 200/600", "loss 41.27", "2.950/tok", "lr 2.00e-03", "gnorm 3.1",
               "12,345 tok/s", "0.210 s/step", "ETA 1m24s", "skipped 0"):
    assert part in line, (part, line)
  assert "GiB" not in line
  with_peak = metrics_lib.progress_line(200, 600, {
    "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "peak_gib": 30.56})
  assert with_peak.endswith("| peak 30.6 GiB"), with_peak


class _FakeDevice:
  def __init__(self, stats):
    self._stats = stats

  def memory_stats(self):
    return self._stats


def test_peak_memory_gib_is_the_highest_device_peak():
  devices = [_FakeDevice({"peak_bytes_in_use": 3 * 2**30}), _FakeDevice(None),
             _FakeDevice({"peak_bytes_in_use": 5 * 2**29})]
  assert metrics_lib.peak_memory_gib(devices) == 3.0
  assert metrics_lib.peak_memory_gib([_FakeDevice(None), _FakeDevice({})]) is None
  assert metrics_lib.peak_memory_gib() is None  # CPU devices report no memory statistics


def test_writer_jsonl_console_and_plot(tmp_path, caplog):
  w = metrics_lib.MetricsWriter(tmp_path, _cfg())
  with caplog.at_level(logging.INFO, logger="sedd_jax.train"):
    for step, loss in ((10, 50.0), (20, 40.0), (30, 30.0)):
      w.train(step, {"loss": loss, "loss_per_token": loss / 10, "lr": 1e-3, "grad_norm": 1.0,
                     "tokens_per_s": 100.0, "step_time": 0.1, "eta_s": 1.0, "skipped": 0})
    w.eval(30, {"valid_loss": 31.0, "valid_loss_per_token": 3.1})
    w.event(30, "finished")
  w.close()
  assert "step 30/600" in caplog.text and "valid loss 31" in caplog.text
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["kind"] for r in rows] == ["train", "train", "train", "eval", "event"]
  assert rows[0]["step"] == 10 and rows[0]["loss"] == 50.0 and "time" in rows[0]
  assert rows[-1]["message"] == "finished"
  # Appending (a resumed run) and a torn last line are tolerated; a repeated step: last wins.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"kind": "train", "step": 30, "loss": 29.0}) + "\n{\"kind\": \"tr")
  rows = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
  assert metrics_lib._series(rows, "train", "loss") == ([10, 20, 30], [50.0, 40.0, 29.0])
  png = metrics_lib.plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert metrics_lib.plot_loss_curve(tmp_path / "none.jsonl", tmp_path / "x.png") is None


def test_throughput():
  t = metrics_lib.Throughput(0)
  t.add_tokens(1000, 800)
  m = t.measure(10)
  assert m["step_time"] > 0 and m["tokens_per_s"] > 0
  assert m["real_tokens_per_s"] == pytest.approx(0.8 * m["tokens_per_s"])


def test_wandb_disabled_is_none(tmp_path):
  assert metrics_lib.init_wandb(_cfg("disabled"), tmp_path) is None


def test_wandb_import_failure_warns_and_continues(tmp_path, monkeypatch, caplog):
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name == "wandb":
      raise ImportError("no wandb here")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", fake_import)
  monkeypatch.setenv("WANDB_MODE", "disabled")
  with caplog.at_level(logging.WARNING):
    w = metrics_lib.MetricsWriter(tmp_path, _cfg("offline"))
  assert "wandb cannot be imported" in caplog.text
  w.train(1, {"loss": 1.0, "lr": 0.0, "grad_norm": 0.0})
  w.close()


def test_wandb_offline_writes_locally(tmp_path, monkeypatch, caplog):
  """Offline mode: a local run folder, no network (WANDB_MODE is forced to offline). wandb is a
  dependency, so a wandb that does not start is a failure here, not a skip."""
  monkeypatch.setenv("WANDB_MODE", "offline")
  with caplog.at_level(logging.WARNING):
    w = metrics_lib.MetricsWriter(tmp_path, _cfg("offline"))
  assert w._wandb is not None, f"wandb did not start offline: {caplog.text}"
  run_id = (tmp_path / "wandb_id").read_text()
  w.train(1, {"loss": 1.0, "lr": 0.0, "grad_norm": 0.0})
  w.close()
  runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
  assert len(runs) == 1 and (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0
