"""Two `python -m sedd_jax.train` processes on 127.0.0.1 (CPU, gloo collectives, 1 device each)
against one process of 2 devices: the same losses and parameters, resume, --fresh, and SIGTERM to
one process stopping both at the same step with a loadable checkpoint.

Every wait has a deadline; when a process fails or a deadline passes, the others are killed and
the test fails with the tails of their logs (a dead peer otherwise leaves the survivor blocked in
a collective).
"""

import pathlib
import re
import shutil
import signal
import socket
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import FAST, ROOT, subprocess_env, train_command, train_config
from sedd_jax import train as train_lib
from sedd_jax.training import checkpoint as ckpt_lib
from sedd_jax.training import checkpointer
from sedd_jax.training import metrics as metrics_lib

STEPS = 6
SAMPLES = {"training.sample_every": 3, "training.ckpt_every": 3}  # samples and checkpoints at 3
LAUNCH_TIMEOUT_S = 300  # one two-process run: start-up, compilation, a few steps, checkpoint


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Pair:
  """Two training processes of one job (process ids 0 and 1), logs in `<logs>/p<i>.log`;
  compilations cached in `<logs>/../jax_cache` for the next pair."""

  def __init__(self, workdir: pathlib.Path, store_path: pathlib.Path, logs: pathlib.Path,
               steps: int, fresh: bool = False, **config):
    args = train_command(workdir, store_path, **{"training.steps": steps, **config})
    args += ["--fresh"] if fresh else []
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    self.logs = [logs / f"p{i}.log" for i in range(2)]
    self.procs = []
    for i in range(2):
      env = subprocess_env(devices=1, fast=True, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                           JAX_COMPILATION_CACHE_DIR=str(logs.parent / "jax_cache"),  # shared
                           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                           JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                           JAX_PROCESS_ID=str(i))
      with open(self.logs[i], "w") as log:
        self.procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=log,
                                           stderr=subprocess.STDOUT))
    self.deadline = time.monotonic() + LAUNCH_TIMEOUT_S

  def text(self, i: int) -> str:
    return self.logs[i].read_text(errors="replace")

  def fail(self, why: str):
    self.kill()
    tails = "\n".join(f"--- process {i} (rc {p.poll()}):\n{self.text(i)[-2500:]}"
                      for i, p in enumerate(self.procs))
    pytest.fail(f"{why}\n{tails}")

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=10)

  def wait_for_line(self, i: int, pattern: str) -> None:
    """Until process i's log matches `pattern` (fails if a process ends or time runs out)."""
    while not re.search(pattern, self.text(i)):
      if any(p.poll() is not None for p in self.procs):
        self.fail(f"a process ended before process {i} logged {pattern!r}")
      if time.monotonic() > self.deadline:
        self.fail(f"timed out waiting for {pattern!r} from process {i}")
      time.sleep(0.2)

  def wait(self) -> list[str]:
    """Both exit codes must be 0; returns the logs."""
    while any(p.poll() is None for p in self.procs):
      if any(p.poll() not in (None, 0) for p in self.procs):
        self.fail("a process failed")
      if time.monotonic() > self.deadline:
        self.fail(f"timed out after {LAUNCH_TIMEOUT_S} s")
      time.sleep(0.2)
    if any(p.returncode != 0 for p in self.procs):
      self.fail("a process failed")
    return [self.text(i) for i in range(2)]


def train_losses(workdir: pathlib.Path) -> dict[int, float]:
  rows = metrics_lib.read_metrics(workdir / metrics_lib.METRICS_FILE)
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def assert_same_losses(run: pathlib.Path, reference: pathlib.Path, steps: list[int]) -> None:
  got, want = train_losses(run), train_losses(reference)
  assert set(steps) <= set(got) and set(steps) <= set(want), (sorted(got), sorted(want))
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-5)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, store):
  """The reference: one process, 2 devices, STEPS steps of the same global batch (8 sequences),
  checkpoints at 3 and 6, samples at 3."""
  workdir = tmp_path_factory.mktemp("one") / "run"
  cfg = train_config(store, **{"training.steps": STEPS, **SAMPLES})
  r = train_lib.train(cfg, workdir, devices=jax.devices()[:2], compiler_options=FAST)
  assert (r.code, r.step) == (0, STEPS)
  return workdir


def test_two_processes_fresh_resume_sigterm(tmp_path, store, one_process):
  """Two processes on a copy of the finished reference run:
  1. `--fresh`, 3 steps: the old run (checkpoints included) is moved aside, training starts at
     step 0 and ends with a checkpoint at 3 equal to the reference's (parameters, EMA to 1e-5;
     the data state exactly); the samples written at step 3 are the reference's.
  2. the same job with no step limit and FSDP (parameters and optimizer state sharded over the
     two processes): resumes from 3; SIGTERM to process 1 alone stops both after the same step,
     exit code 0, one new loadable checkpoint at that step.
  The loss of every step equals the one-process run's to 1e-5.
  """
  run = tmp_path / "run"
  shutil.copytree(one_process, run)
  Pair(run, store, tmp_path / "a", steps=3, fresh=True, **SAMPLES).wait()
  moved = list(run.glob("old-*"))
  assert len(moved) == 1 and (moved[0] / "checkpoints" / str(STEPS)).is_dir()
  assert checkpointer.Checkpointer(run).all_steps() == [3]
  assert_same_losses(run, one_process, [1, 2, 3])
  items = ("params", "ema", "data")
  a = ckpt_lib.read_items(run / "checkpoints" / "3", items)
  b = ckpt_lib.read_items(one_process / "checkpoints" / "3", items)
  assert a["data"] == b["data"]  # the same global batches were drawn
  pairs = zip(jax.tree.leaves((a["params"], a["ema"])), jax.tree.leaves((b["params"], b["ema"])))
  for x, y in pairs:
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  samples = "samples/step_3.fasta"
  assert (run / samples).read_text() == (one_process / samples).read_text()

  pair = Pair(run, store, tmp_path / "b", steps=100_000, **{"training.fsdp": True})
  pair.wait_for_line(0, r"step 5/100000 \|")
  pair.procs[1].send_signal(signal.SIGTERM)
  logs = pair.wait()
  assert all("resumed from" in log for log in logs)
  assert "SIGTERM received" in logs[1] and "SIGTERM received" not in logs[0]
  stops = [re.findall(r"stopped by SIGTERM at step (\d+); checkpoint written", log)
           for log in logs]
  assert stops[0] and stops[0] == stops[1], stops
  stop = int(stops[0][0])
  assert checkpointer.Checkpointer(run).all_steps() == [3, stop]
  assert max(train_losses(run)) == stop
  assert_same_losses(run, one_process, list(range(4, min(stop, STEPS) + 1)))
  model, cfg, _, _ = ckpt_lib.load_for_inference(run)
  assert cfg.training.steps == 100_000
  out = model(jnp.full((1, 32), 5, jnp.int32), jnp.ones((1,)))
  assert bool(jnp.all(jnp.isfinite(out)))
