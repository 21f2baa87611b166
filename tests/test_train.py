"""The training CLI (`python -m sedd_jax.train`) in a subprocess: a changed model shape, SIGTERM."""

import signal
import subprocess
import threading

import jax.numpy as jnp

from helpers import ROOT, subprocess_env, train_command, train_config
from sedd_jax import diffusion
from sedd_jax import train as train_lib
from sedd_jax.training import checkpoint as ckpt_lib
from sedd_jax.training import checkpointer
from sedd_jax.training import state as state_lib


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
