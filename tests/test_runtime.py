"""The training job's runtime pieces (`sedd_jax.training.runtime`) without a model."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from helpers import ROOT, subprocess_env
from sedd_jax.training import runtime


class _Counter:
  """An iterator with grain's get_state(): batches {"x": [i]}, state = batches drawn."""

  def __init__(self, fail_at=None):
    self.i, self.fail_at = 0, fail_at

  def __next__(self):
    if self.i == self.fail_at:
      raise ValueError(f"bad record {self.i}")
    self.i += 1
    return {"x": np.array([self.i - 1])}

  def get_state(self):
    return {"drawn": self.i}


def test_prefetcher_yields_each_batch_with_the_state_after_it():
  p = runtime.Prefetcher(_Counter(), put=lambda b: {"x": b["x"] * 10},
                         count=lambda b: (4, int(b["x"][0])))
  try:
    got = [p.next() for _ in range(5)]
  finally:
    p.close()
  assert [int(b["x"][0]) for b, *_ in got] == [0, 10, 20, 30, 40]
  assert [s["drawn"] for _, s, _, _ in got] == [1, 2, 3, 4, 5]
  assert [(pad, real) for *_, pad, real in got] == [(4.0, float(i)) for i in range(5)]


def test_prefetcher_reraises_the_iterator_error_in_the_consumer():
  p = runtime.Prefetcher(_Counter(fail_at=2), put=dict, count=lambda b: (1, 1))
  try:
    assert [int(p.next()[0]["x"][0]) for _ in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="bad record 2"):
      p.next()
  finally:
    p.close()


def wait_for(condition, timeout: float = 10.0) -> bool:
  """Whether `condition()` became true within `timeout` seconds (polled)."""
  deadline = time.monotonic() + timeout
  while not condition():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.01)
  return True


def test_stop_flag_is_set_by_sigterm_and_uninstalls():
  flag = runtime.StopFlag()
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  flag.install()
  try:
    assert not flag and flag.agreed() is None
    os.kill(os.getpid(), signal.SIGTERM)
    assert wait_for(lambda: bool(flag))  # set by the watcher thread
    assert flag.reason == "SIGTERM" and flag.agreed() == "SIGTERM"
  finally:
    flag.uninstall()
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
  assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd was given back


def test_stop_flag_keeps_the_first_signal():
  flag = runtime.StopFlag()
  assert (flag.signum, flag.reason, bool(flag)) == (0, None, False)
  flag.on_signal(signal.SIGTERM)
  assert (flag.signum, flag.reason, bool(flag)) == (signal.SIGTERM, "SIGTERM", True)
  flag.on_signal(signal.SIGTERM)  # a later SIGTERM changes nothing (a SIGINT would abort)
  assert flag.reason == "SIGTERM" and flag.agreed() == "SIGTERM"


# Installs a StopFlag, then blocks in native code (a device computation that never ends), where
# no Python signal handler can run.
BLOCKED = ("import jax, jax.numpy as jnp\n"
           "from sedd_jax.training import runtime\n"
           "runtime.StopFlag().install()\n"
           "forever = jax.jit(lambda x: jax.lax.while_loop(lambda v: v > -1.0,\n"
           "                                               lambda v: v * 0.5 + 1.0, x))\n"
           "print('blocking', flush=True)\n"
           "forever(jnp.float32(0.0)).block_until_ready()\n")


def test_a_second_ctrl_c_aborts_at_once_even_in_native_code():
  """SIGINT, then SIGINT again, to a process stuck in a device computation: the first is
  reported at once, the second ends the process at once with one line and exit code 130 (no
  KeyboardInterrupt traceback, no crash at interpreter shutdown)."""
  proc = subprocess.Popen([sys.executable, "-c", BLOCKED], cwd=ROOT, env=subprocess_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  watchdog = threading.Timer(60, proc.kill)  # a signal never acted on: no endless wait
  watchdog.start()
  try:
    assert proc.stdout.readline() == "blocking\n"
    time.sleep(0.5)  # inside the computation
    proc.send_signal(signal.SIGINT)
    first = proc.stderr.readline()
    assert first.endswith("SIGINT received: finishing the current step, then checkpointing and "
                          "stopping (Ctrl-C again aborts without a checkpoint)\n"), first
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=20)
    assert time.monotonic() - t0 < 5
    rest = proc.stderr.read()
  finally:
    watchdog.cancel()
    proc.kill()  # SIGKILL: the computation never ends by itself
    proc.wait()
  assert rc == runtime.EXIT_ABORTED == 130
  assert rest.splitlines()[-1].endswith(
    "second interrupt: stopped at once without a final checkpoint (exit code 130); the newest "
    "complete checkpoint is kept: run the same command to resume"), rest
  assert "Traceback" not in rest and len(rest.splitlines()) == 1, rest
