"""`sedd_jax.training.loop.train` end to end on the micro config: resume, the finished run,
--fresh, bad data inputs, an unusable or busy workdir, the non-finite stop, the lagged metric
read, stop reasons."""

import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import FAST, assert_trees_equal, spy_predictors, train_config
from sedd_jax import diffusion
from sedd_jax.data.fasta import DataError
from sedd_jax.training import checkpoint as ckpt_lib
from sedd_jax.training import checkpointer
from sedd_jax.training import loop
from sedd_jax.training import metrics as metrics_lib
from sedd_jax.training import run as run_lib
from sedd_jax.training import sedd_task as sedd_task_lib
from sedd_jax.training import state as state_lib
from sedd_jax.training import workdir as workdir_lib
from sedd_jax.training.workdir import WorkdirError


def test_resume_is_bit_identical(tmp_path, store, monkeypatch):
  """6 steps in one go == 3 steps, stop, resume, 3 steps (params, EMA, data state exactly)."""
  cfg = train_config(store, **{"training.eval_every": 3, "training.sample_every": 3,
                               "sampling.predictor": "first_hitting"})
  predictors = spy_predictors(monkeypatch)  # the samples use the config's predictor
  a = loop.train(cfg, tmp_path / "a", compiler_options=FAST)
  assert (a.code, a.step, a.reason) == (0, 6, "finished")
  b1 = loop.train(cfg, tmp_path / "b", stop_after=3, compiler_options=FAST)
  assert (b1.code, b1.step) == (0, 3)
  assert checkpointer.Checkpointer(tmp_path / "b").all_steps() == [3]
  b2 = loop.train(cfg, tmp_path / "b", compiler_options=FAST)
  assert (b2.code, b2.step) == (0, 6)
  ra = ckpt_lib.read_items(tmp_path / "a" / "checkpoints" / "6")
  rb = ckpt_lib.read_items(tmp_path / "b" / "checkpoints" / "6")
  assert_trees_equal(ra["params"], rb["params"])
  assert_trees_equal(ra["ema"], rb["ema"])
  assert ra["data"] == rb["data"] and ra["train"] == rb["train"]
  # The parameters did move, and the EMA differs from them.
  r3 = ckpt_lib.read_items(tmp_path / "b" / "checkpoints" / "3")
  assert not np.array_equal(r3["params"]["vocab_embed"]["embedding"],
                            ra["params"]["vocab_embed"]["embedding"])
  # Metrics, validation, samples, plot.
  rows = metrics_lib.read_metrics(tmp_path / "a" / metrics_lib.METRICS_FILE)
  train_rows = [r for r in rows if r["kind"] == "train"]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time", "skipped"):
    assert key in train_rows[-1]
  assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 3, 6]
  assert (tmp_path / "a" / metrics_lib.LOSS_CURVE_FILE).stat().st_size > 1000
  fasta = (tmp_path / "a" / "samples" / "step_6.fasta").read_text().splitlines()
  assert len(fasta) == 4 and fasta[0].startswith(">sample_0 step=6")
  assert predictors and set(predictors) == {"first_hitting"}
  assert set(fasta[1]) <= set("LAGVSERTIDPKQNFYMHWC")
  # The rows of the resumed run are the same as the continuous run's.
  rows_b = [r for r in metrics_lib.read_metrics(tmp_path / "b" / metrics_lib.METRICS_FILE)
            if r["kind"] == "train"]
  assert [r["loss"] for r in rows_b] == [r["loss"] for r in train_rows]


def test_finished_run_exits_at_once_and_fresh_moves_aside(tmp_path, store):
  """A finished run: the same config says so at once; a changed model shape is refused first
  (not 'nothing to do'); --fresh moves the run aside."""
  cfg = train_config(store, **{"training.steps": 2})
  assert loop.train(cfg, tmp_path, compiler_options=FAST).step == 2
  t0 = time.perf_counter()
  again = loop.train(cfg, tmp_path, compiler_options=FAST)
  assert (again.code, again.step, again.reason) == (0, 2, "done")
  assert time.perf_counter() - t0 < 10
  wider = train_config(store, **{"training.steps": 2, "model.hidden_size": 64})
  with pytest.raises(ckpt_lib.ShapeMismatch, match=r"model.hidden_size \(saved 32, now 64\)"):
    loop.train(wider, tmp_path, compiler_options=FAST)
  fresh = loop.train(cfg, tmp_path, fresh=True, stop_after=0, compiler_options=FAST)
  assert fresh.step == 0
  old = [p for p in tmp_path.iterdir() if p.name.startswith("old-")]
  assert len(old) == 1
  assert (old[0] / "checkpoints" / "2").is_dir() and (old[0] / "metrics.jsonl").is_file()
  assert checkpointer.Checkpointer(tmp_path).all_steps() == [0]


def test_bad_data_inputs_fail_before_the_workdir_is_written(tmp_path, store):
  cfg = train_config(tmp_path / "nostore", **{"data.fasta": str(tmp_path / "nonexistent.fa")})
  with pytest.raises(DataError, match="nonexistent.fa does not exist"):
    loop.train(cfg, tmp_path / "run", compiler_options=FAST)
  assert sorted(tmp_path.iterdir()) == []  # no workdir, no store


def test_a_workdir_that_is_the_store_fails_before_anything_is_written(tmp_path):
  """data.prepared = the workdir, neither there yet: refused before the store is prepared."""
  with pytest.raises(WorkdirError, match=f"workdir {tmp_path / 'run'} is the data store"):
    loop.train(train_config(tmp_path / "run"), tmp_path / "run", compiler_options=FAST)
  assert sorted(tmp_path.iterdir()) == []


def test_a_second_trainer_on_a_workdir_in_use_fails_at_once_and_writes_nothing(tmp_path, store):
  """The workdir's lock is held (here by this process, as a running job holds it): `train`,
  even with --fresh, fails at once naming the workdir and the holder's pid, and neither moves
  nor writes anything; once the lock is released the same call starts over."""
  work = tmp_path / "run"
  cfg = train_config(store, **{"training.steps": 1})
  held = workdir_lib.lock(work)
  (work / "metrics.jsonl").write_text("the running job's\n")
  before = {p.name: p.read_bytes() for p in work.iterdir()}
  try:
    t0 = time.perf_counter()
    with pytest.raises(WorkdirError) as e:
      loop.train(cfg, work, fresh=True, compiler_options=FAST)
    assert time.perf_counter() - t0 < 5
    assert str(e.value).startswith(f"workdir {work} is in use by another training job: pid "
                                   f"{os.getpid()} on host ")
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before
  finally:
    held.release()
  assert loop.train(cfg, work, fresh=True, stop_after=0, compiler_options=FAST).step == 0
  (old,) = work.glob("old-*")
  assert (old / "metrics.jsonl").read_text() == "the running job's\n"


def test_non_finite_steps_stop_the_run(tmp_path, store, monkeypatch, caplog):
  """Every loss NaN: each step is skipped; after max_bad_steps the run stops with a checkpoint
  holding the untouched initial parameters."""
  def nan_losses(model, graph, noise, tokens, *args):
    return jnp.full((tokens.shape[0],), jnp.nan) + 0.0 * model(
      tokens, jnp.ones((tokens.shape[0],)), None).sum()

  monkeypatch.setattr(sedd_task_lib, "sequence_losses", nan_losses)
  cfg = train_config(store, **{"training.steps": 20, "training.max_bad_steps": 3})
  with caplog.at_level("ERROR"):
    r = loop.train(cfg, tmp_path, compiler_options=FAST, cache=run_lib.CompileCache())
  assert (r.code, r.step, r.reason) == (loop.EXIT_NONFINITE, 3, "non-finite")
  assert "3 consecutive steps with a non-finite" in caplog.text
  items = ckpt_lib.read_items(tmp_path / "checkpoints" / "3")
  assert items["train"]["skipped"] == 3 and items["train"]["bad_steps"] == 3
  graph = diffusion.get_graph(cfg.graph)
  _, params, _ = state_lib.split_model(state_lib.build_model(cfg, graph))
  assert_trees_equal(items["params"], nnx.to_pure_dict(params))
  rows = [r for r in metrics_lib.read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
  assert rows[-1]["skipped"] == 3


def test_loop_reads_no_metric_of_the_step_just_queued(tmp_path, store, monkeypatch):
  """Between log rows the loop reads a step's `bad_steps` only after the next step is queued."""
  events = []

  class Recording(run_lib.CompileCache):
    def get(self, kind, *args):
      fn = run_lib.COMPILE_CACHE.get(kind, *args)
      if kind != "train":
        return fn

      def step(*a):
        state, m = fn(*a)
        events.append(("queued", id(m["bad_steps"])))
        return state, m
      return step

  device_get = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: events.append(("read", id(x))) or device_get(x))
  cfg = train_config(store, **{"training.steps": 5, "training.log_every": 100})
  assert loop.train(cfg, tmp_path, compiler_options=FAST, cache=Recording()).step == 5
  queued = [i for kind, i in events if kind == "queued"]
  assert len(queued) == 5
  for n, i in enumerate(queued[:-1]):
    first_read = events.index(("read", i))
    assert first_read > events.index(("queued", queued[n + 1])), f"step {n + 1} read at once"


def test_stop_reason_a_signal_first_then_stop_after():
  class Flag:
    def __init__(self, reason):
      self.reason = reason

    def agreed(self, step):
      return self.reason

  run = types.SimpleNamespace(stop=Flag(None), step=5, start_step=3, stop_after=None)
  assert loop._stop_reason(run) is None
  run.stop_after = 2
  assert loop._stop_reason(run) == "stop_after"
  run.stop_after = 3
  assert loop._stop_reason(run) is None
  run.stop = Flag("SIGTERM")
  run.stop_after = 2
  assert loop._stop_reason(run) == "stopped by SIGTERM"
