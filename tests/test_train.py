"""The training job end to end on the micro config: resume, NaN stop, SIGTERM, --fresh."""

import signal
import subprocess
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import FAST, ROOT, assert_trees_equal, subprocess_env, train_command, train_config
from sedd_jax import diffusion
from sedd_jax import train as train_lib
from sedd_jax.data.fasta import DataError
from sedd_jax.training import checkpoint as ckpt_lib
from sedd_jax.training import metrics as metrics_lib
from sedd_jax.training import run as run_lib
from sedd_jax.training import state as state_lib
from sedd_jax.training import sedd_task as sedd_task_lib

def test_resume_is_bit_identical(tmp_path, store):
  """6 steps in one go == 3 steps, stop, resume, 3 steps (params, EMA, data state exactly)."""
  cfg = train_config(store, **{"training.eval_every": 3, "training.sample_every": 3})
  a = train_lib.train(cfg, tmp_path / "a", compiler_options=FAST)
  assert (a.code, a.step, a.reason) == (0, 6, "finished")
  b1 = train_lib.train(cfg, tmp_path / "b", stop_after=3, compiler_options=FAST)
  assert (b1.code, b1.step) == (0, 3)
  assert ckpt_lib.Checkpointer(tmp_path / "b").all_steps() == [3]
  b2 = train_lib.train(cfg, tmp_path / "b", compiler_options=FAST)
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
  assert set(fasta[1]) <= set("LAGVSERTIDPKQNFYMHWC")
  # The rows of the resumed run are the same as the continuous run's.
  rows_b = [r for r in metrics_lib.read_metrics(tmp_path / "b" / metrics_lib.METRICS_FILE)
            if r["kind"] == "train"]
  assert [r["loss"] for r in rows_b] == [r["loss"] for r in train_rows]


def test_finished_run_exits_at_once_and_fresh_moves_aside(tmp_path, store):
  cfg = train_config(store, **{"training.steps": 2})
  assert train_lib.train(cfg, tmp_path, compiler_options=FAST).step == 2
  t0 = time.perf_counter()
  again = train_lib.train(cfg, tmp_path, compiler_options=FAST)
  assert (again.code, again.step, again.reason) == (0, 2, "done")
  assert time.perf_counter() - t0 < 10
  fresh = train_lib.train(cfg, tmp_path, fresh=True, stop_after=0, compiler_options=FAST)
  assert fresh.step == 0
  old = [p for p in tmp_path.iterdir() if p.name.startswith("old-")]
  assert len(old) == 1
  assert (old[0] / "checkpoints" / "2").is_dir() and (old[0] / "metrics.jsonl").is_file()
  assert ckpt_lib.Checkpointer(tmp_path).all_steps() == [0]


def test_bad_data_inputs_fail_before_the_workdir_is_written(tmp_path, store):
  cfg = train_config(tmp_path / "nostore", **{"data.fasta": str(tmp_path / "nonexistent.fa")})
  with pytest.raises(DataError, match="nonexistent.fa does not exist"):
    train_lib.train(cfg, tmp_path / "run", compiler_options=FAST)
  assert sorted(tmp_path.iterdir()) == []  # no workdir, no store


def test_resume_with_another_model_shape_names_the_keys(tmp_path, store):
  """The CLI on a workdir whose checkpoint has another model shape: exit 2 with one error line
  naming the config key and what to do; the checkpoint and config.json stay as they were."""
  cfg = train_config(store)
  graph = diffusion.get_graph(cfg.graph)
  _, params, _ = state_lib.split_model(state_lib.build_model(cfg, graph))
  ck = ckpt_lib.Checkpointer(tmp_path / "run")
  ck.save(state_lib.init_state(cfg, params).replace(step=jnp.int32(2)), None, cfg)
  ck.close()
  (tmp_path / "run" / "config.json").write_text("{}")
  args = train_command(tmp_path / "run", store, **{"model.hidden_size": 64})
  p = subprocess.run(args, cwd=ROOT, env=subprocess_env(devices=1), capture_output=True,
                     text=True, timeout=240)
  assert p.returncode == train_lib.EXIT_CONFIG, p.stderr[-3000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
  assert "e.g. params blocks.0.adaLN_modulation.bias: saved (192,), now (384,)" in errors[0]
  assert "model.hidden_size (saved 32, now 64)" in errors[0]
  assert "--fresh" in errors[0] and "--workdir" in errors[0]
  assert len(p.stderr.splitlines()) < 15, p.stderr
  assert ckpt_lib.Checkpointer(tmp_path / "run").all_steps() == [2]
  assert (tmp_path / "run" / "config.json").read_text() == "{}"
  assert not (tmp_path / "run" / ckpt_lib.CORRUPT).exists()


def test_non_finite_steps_stop_the_run(tmp_path, store, monkeypatch, caplog):
  """Every loss NaN: each step is skipped; after max_bad_steps the run stops with a checkpoint
  holding the untouched initial parameters."""
  def nan_losses(model, graph, noise, tokens, *args):
    return jnp.full((tokens.shape[0],), jnp.nan) + 0.0 * model(
      tokens, jnp.ones((tokens.shape[0],)), None).sum()

  monkeypatch.setattr(sedd_task_lib, "sequence_losses", nan_losses)
  cfg = train_config(store, **{"training.steps": 20, "training.max_bad_steps": 3})
  with caplog.at_level("ERROR"):
    r = train_lib.train(cfg, tmp_path, compiler_options=FAST, cache=run_lib.CompileCache())
  assert (r.code, r.step, r.reason) == (train_lib.EXIT_NONFINITE, 3, "non-finite")
  assert "3 consecutive steps with a non-finite" in caplog.text
  items = ckpt_lib.read_items(tmp_path / "checkpoints" / "3")
  assert items["train"]["skipped"] == 3 and items["train"]["bad_steps"] == 3
  graph = diffusion.get_graph(cfg.graph)
  _, params, _ = state_lib.split_model(state_lib.build_model(cfg, graph))
  from flax import nnx
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
  assert train_lib.train(cfg, tmp_path, compiler_options=FAST, cache=Recording()).step == 5
  queued = [i for kind, i in events if kind == "queued"]
  assert len(queued) == 5
  for n, i in enumerate(queued[:-1]):
    first_read = events.index(("read", i))
    assert first_read > events.index(("queued", queued[n + 1])), f"step {n + 1} read at once"


def test_sigterm_leaves_a_loadable_checkpoint(tmp_path, store):
  """The CLI in a subprocess: SIGTERM after the first logged step -> checkpoint, exit 0."""
  args = train_command(tmp_path / "run", store, **{"training.steps": 100000})
  # 2 simulated devices and XLA's quick CPU compilation keep this test short.
  proc = subprocess.Popen(args, cwd=ROOT, env=subprocess_env(devices=2, fast=True),
                          stderr=subprocess.PIPE, text=True)
  watchdog = threading.Timer(240, proc.kill)
  watchdog.start()
  log = []
  try:
    for line in proc.stderr:
      log.append(line)
      if "step 1/100000" in line:
        proc.send_signal(signal.SIGTERM)
        break
    log += proc.stderr.readlines()
    rc = proc.wait(timeout=120)
  finally:
    watchdog.cancel()
    if proc.poll() is None:
      proc.kill()
  text = "".join(log)
  assert rc == 0, text[-3000:]
  assert "SIGTERM received" in text and "checkpoint written" in text
  steps = ckpt_lib.Checkpointer(tmp_path / "run").all_steps()
  assert len(steps) == 1 and steps[0] >= 1
  model, cfg, graph, noise = ckpt_lib.load_for_inference(tmp_path / "run")
  assert cfg.training.steps == 100000 and cfg.model.hidden_size == 32
  out = model(jnp.full((1, 32), 5, jnp.int32), jnp.ones((1,)))
  assert bool(jnp.all(jnp.isfinite(out)))
