"""The training CLI (`python -m sedd_jax.train`) in a subprocess: a changed model shape, SIGTERM,
a second Ctrl-C, an unusable or busy workdir."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import jax.numpy as jnp

from helpers import ROOT, subprocess_env, train_command, train_config
from sedd_jax import diffusion
from sedd_jax import train as train_lib
from sedd_jax.training import checkpoint as ckpt_lib
from sedd_jax.training import checkpointer
from sedd_jax.training import state as state_lib
from sedd_jax.training import workdir as workdir_lib


def test_resume_with_another_model_shape_names_the_keys(tmp_path, store):
  """The CLI on a workdir whose checkpoint has another model shape: exit 2 with one error line
  naming the config key and what to do; the checkpoint and config.json stay as they were."""
  cfg = train_config(store)
  graph = diffusion.get_graph(cfg.graph)
  _, params, _ = state_lib.split_model(state_lib.build_model(cfg, graph))
  ck = checkpointer.Checkpointer(tmp_path / "run")
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
  assert checkpointer.Checkpointer(tmp_path / "run").all_steps() == [2]
  assert (tmp_path / "run" / "config.json").read_text() == "{}"
  assert not (tmp_path / "run" / checkpointer.CORRUPT).exists()


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
  steps = checkpointer.Checkpointer(tmp_path / "run").all_steps()
  assert len(steps) == 1 and steps[0] >= 1
  model, cfg, graph, noise = ckpt_lib.load_for_inference(tmp_path / "run")
  assert cfg.training.steps == 100000 and cfg.model.hidden_size == 32
  out = model(jnp.full((1, 32), 5, jnp.int32), jnp.ones((1,)))
  assert bool(jnp.all(jnp.isfinite(out)))


# The CLI whose final checkpoint (after a signal) waits for the periodic ones, says so on stderr
# and then takes forever: a slow save, where a second Ctrl-C must still end the job at once.
SLOW_FINAL_SAVE = """
import sys, time
from sedd_jax import train
from sedd_jax.training import hooks
save = hooks.save
def slow_final_save(run, why):
  if not why.startswith("stopped"):
    return save(run, why)
  run.ckpt.wait()
  print("final save", file=sys.stderr, flush=True)
  time.sleep(600)
hooks.save = slow_final_save
sys.argv[0] = "sedd_jax.train"
train.run()
"""


def test_a_second_ctrl_c_aborts_at_once_keeping_the_checkpoints(tmp_path, store):
  """Ctrl-C, then Ctrl-C again while the final checkpoint is being written: exit code 130 at
  once, one line naming the newest complete checkpoint (still loadable), no traceback, no
  crash."""
  work = tmp_path / "run"
  args = train_command(work, store, **{"training.steps": 100000, "training.ckpt_every": 2})
  proc = subprocess.Popen([sys.executable, "-c", SLOW_FINAL_SAVE, *args[3:]], cwd=ROOT,
                          env=subprocess_env(devices=1, fast=True), stderr=subprocess.PIPE,
                          text=True)
  watchdog = threading.Timer(120, proc.kill)
  watchdog.start()
  log = []
  try:
    for line in proc.stderr:
      log.append(line)
      if "step 3/100000" in line:
        proc.send_signal(signal.SIGINT)
      if line == "final save\n":  # the loop is in its final checkpoint
        proc.send_signal(signal.SIGINT)
        break
    log += proc.stderr.readlines()
    rc = proc.wait(timeout=30)
  finally:
    watchdog.cancel()
    proc.kill()
  text = "".join(log)
  assert rc == train_lib.EXIT_ABORTED, text[-3000:]
  steps = checkpointer.Checkpointer(work).all_steps()
  assert steps and steps[-1] >= 2 and steps[-1] % 2 == 0, steps
  newest = work / "checkpoints" / str(steps[-1])
  assert log[-1].endswith(
    "second interrupt: stopped at once without a final checkpoint (exit code 130); the newest "
    f"complete checkpoint is step {steps[-1]} ({newest}): run the same command to resume\n"), text
  assert "Traceback" not in text and "Segmentation" not in text, text[-3000:]
  items = ckpt_lib.read_items(newest, ("train",))
  assert items["train"]["step"] == steps[-1]


def test_an_unusable_or_busy_workdir_is_one_error_line_and_nothing_is_written(tmp_path, store):
  """The CLI on a workdir that is a file, and on one whose lock a running job holds (here this
  process): exit 2, one line naming the workdir (and the holder's pid and host), the workdir as
  it was."""
  env = subprocess_env(devices=1)
  (tmp_path / "file").write_text("x")
  p = subprocess.run(train_command(tmp_path / "file", store), cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=240)
  assert p.returncode == train_lib.EXIT_CONFIG, p.stderr[-3000:]
  assert p.stderr.splitlines()[-1] == (
    f"error: workdir {tmp_path / 'file'} is a file, not a folder: pass another --workdir")
  assert "Traceback" not in p.stderr and (tmp_path / "file").read_text() == "x"
  work = tmp_path / "run"
  held = workdir_lib.lock(work)
  try:
    content = (work / ".lock").read_text()
    p = subprocess.run(train_command(work, store) + ["--fresh"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    assert os.listdir(work) == [".lock"] and (work / ".lock").read_text() == content
  finally:
    held.release()
  assert p.returncode == train_lib.EXIT_CONFIG, p.stderr[-3000:]
  since = json.loads(content)["since"]
  assert p.stderr.splitlines()[-1] == (
    f"error: workdir {work} is in use by another training job: pid {os.getpid()} on host "
    f"{socket.gethostname()}, running since {since} (it holds {work / '.lock'}); wait for it "
    "to end, stop it, or pass another --workdir")
  assert "Traceback" not in p.stderr, p.stderr[-3000:]


# A Ctrl-C while the job is still setting up (before the signal watcher exists): build_run
# is where it spends that time (model, restore, data, compilation).
INTERRUPTED_SET_UP = """
import sys
from sedd_jax import train
from sedd_jax.training import loop
def interrupted(*args, **kwargs):
  raise KeyboardInterrupt
loop.build_run = interrupted
sys.argv[0] = "sedd_jax.train"
train.run()
"""


def test_a_ctrl_c_during_set_up_is_one_line_and_exit_130(tmp_path, store):
  args = train_command(tmp_path / "run", store)
  p = subprocess.run([sys.executable, "-c", INTERRUPTED_SET_UP, *args[3:]], cwd=ROOT,
                     env=subprocess_env(devices=1), capture_output=True, text=True, timeout=240)
  assert p.returncode == 130, p.stderr[-3000:]
  assert "Traceback" not in p.stderr and "Segmentation" not in p.stderr, p.stderr[-3000:]
  assert p.stderr.strip().splitlines()[-1] == (
    "interrupted during set-up: nothing was trained in this call; the workdir's complete "
    "checkpoints are unchanged")
