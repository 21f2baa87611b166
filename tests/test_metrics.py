"""Metrics: progress line, JSONL rows (one per step after a resume), loss-curve figure and PNG,
wandb modes (never online)."""

import builtins
import json
import logging

import jax
import pytest

from helpers import FAST, load_config, train_config
from sedd_jax.training import hooks
from sedd_jax.training import loop
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


def _write_rows(path, rows, tail=""):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_supersede_replayed_marks_the_rows_after_the_resume_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"kind": "eval", "step": 0}, {"kind": "train", "step": 2},
          {"kind": "train", "step": 4}, {"kind": "eval", "step": 4},
          {"kind": "sample", "step": 6}, {"kind": "train", "step": 6},
          {"kind": "event", "step": 6, "message": "stopped: disk full"}]
  torn = '{"kind": "train", "st'
  _write_rows(path, rows, torn + "\n")
  assert metrics_lib.supersede_replayed(path, 4) == 2  # train 6, sample 6; not the event
  lines = path.read_text().splitlines()
  assert [json.loads(x).get("superseded", False) for x in lines[:-1]] == [
    False, False, False, False, True, True, False]
  assert lines[-1] == torn  # kept as it was
  assert [json.loads(x) for x in lines[:4]] == rows[:4]
  before = path.read_text()
  assert metrics_lib.supersede_replayed(path, 4) == 0 and path.read_text() == before
  assert [(r["kind"], r["step"]) for r in metrics_lib.read_metrics(path)] == [
    ("eval", 0), ("train", 2), ("train", 4), ("eval", 4), ("event", 6)]
  assert len(metrics_lib.read_metrics(path, superseded=True)) == 7
  # From step 0 (no checkpoint) everything but events is run again, step 0's validation too.
  assert metrics_lib.supersede_replayed(path, 0) == 4
  assert [r["kind"] for r in metrics_lib.read_metrics(path)] == ["event"]
  assert metrics_lib.supersede_replayed(tmp_path / "none.jsonl", 3) == 0


def test_a_row_after_a_torn_line_is_kept(tmp_path):
  """A crash mid-write leaves a last line without its newline; the next run's first row
  must not be glued to it (and lost)."""
  _write_rows(tmp_path / "metrics.jsonl", [{"kind": "train", "step": 1, "loss": 3.0}],
              '{"kind": "train", "step": 2, "lo')
  w = metrics_lib.MetricsWriter(tmp_path, _cfg())
  w.train(2, {"loss": 2.0, "lr": 0.0, "grad_norm": 0.0})
  w.close()
  rows = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 3.0), (2, 2.0)]


class _Crash(Exception):
  pass


def test_a_resume_after_a_crash_gives_one_train_row_per_step(tmp_path, store, monkeypatch):
  """A run killed after step 4's row, its newest checkpoint at step 2; the resumed run writes
  steps 3 and 4 again. Readers see one row per step (the resumed run's), the file keeps every
  row, and the rows of the steps that were not replayed are untouched."""
  cfg = train_config(store, **{"training.ckpt_every": 2})  # 6 steps, a train row each
  work = tmp_path / "run"
  periodic = hooks.periodic

  def crash_at_4(run):
    if run.step == 4:  # after step 4's train row, before its checkpoint
      raise _Crash()
    periodic(run)

  monkeypatch.setattr(hooks, "periodic", crash_at_4)
  with pytest.raises(_Crash):
    loop.train(cfg, work, devices=jax.devices()[:1], compiler_options=FAST)
  monkeypatch.undo()
  path = work / metrics_lib.METRICS_FILE
  first = path.read_text().splitlines()
  assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["2"]
  assert loop.train(cfg, work, devices=jax.devices()[:1], compiler_options=FAST).step == 6
  train = [r for r in metrics_lib.read_metrics(path) if r["kind"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
  everything = metrics_lib.read_metrics(path, superseded=True)
  assert [(r["step"], r.get("superseded", False)) for r in everything if r["kind"] == "train"] \
      == [(1, False), (2, False), (3, True), (4, True), (3, False), (4, False), (5, False),
          (6, False)]
  assert path.read_text().splitlines()[:2] == first[:2]  # steps 1 and 2, byte for byte
  replayed = [r for r in everything if r.get("superseded")]
  assert [r["loss"] for r in replayed] == [r["loss"] for r in train[2:4]]  # exact resume
  assert [r["message"] for r in everything if r["kind"] == "event"] == ["finished"]


def _train_row(step, loss, **extra):
  return {"kind": "train", "step": step, "loss": loss, "loss_per_token": loss / 10, **extra}


def _lines(ax):
  return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
          for line in ax.get_lines()}


def test_loss_figure_draws_the_unigram_baseline_per_residue():
  rows = [_train_row(10, 50.0), _train_row(20, 40.0),
          {"kind": "eval", "step": 20, "valid_loss": 41.0, "valid_loss_per_token": 4.1},
          {"kind": "baseline", "step": 20, "unigram_per_token": 2.9},
          {"kind": "baseline", "step": 30, "unigram_per_token": 2.8993}]  # the last one
  per_sequence, per_residue = metrics_lib.loss_figure(rows).axes
  assert _lines(per_sequence) == {"train": ([10, 20], [50.0, 40.0]),
                                  "valid (EMA)": ([20], [41.0])}
  assert _lines(per_residue) == {"train": ([10, 20], [5.0, 4.0]), "valid (EMA)": ([20], [4.1]),
                                 "unigram baseline (valid) 2.899": ([0, 1], [2.8993, 2.8993])}
  assert per_residue.get_lines()[-1].get_linestyle() == "--"
  assert metrics_lib.loss_figure([{"kind": "event", "step": 0}]) is None


def test_loss_figure_draws_one_curve_per_protein_ligand_mode():
  """The protein-ligand rows: `loss` is the drawn mode's (it jumps between modes); each mode's
  own loss is a curve, train and validation."""
  rows = [_train_row(1, 90.0, **{"loss/protein_only": 90.0}),
          _train_row(2, 30.0, **{"loss/joint": 30.0}),
          _train_row(3, 80.0, **{"loss/protein_only": 80.0}),
          {"kind": "eval", "step": 3, "valid_loss": 55.0, "valid_loss/protein_only": 85.0,
           "valid_loss/joint": 25.0}]
  train, valid = metrics_lib.loss_figure(rows).axes
  assert _lines(train) == {"joint": ([2], [30.0]), "protein_only": ([1, 3], [90.0, 80.0])}
  assert _lines(valid) == {"joint": ([3], [25.0]), "protein_only": ([3], [85.0])}
  assert train.get_ylabel() == "train loss per sequence, by mode"
  # One trained mode: its validation loss is `valid_loss`.
  one = [_train_row(1, 30.0, **{"loss/joint": 30.0}), {"kind": "eval", "step": 1,
                                                       "valid_loss": 25.0}]
  assert _lines(metrics_lib.loss_figure(one).axes[1]) == {"joint": ([1], [25.0])}
