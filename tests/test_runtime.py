"""The training job's runtime pieces (`sedd_jax.training.runtime`) without a model."""

import os
import signal

import numpy as np
import pytest

from sedd_jax.training import runtime


def test_prepare_workdir_moves_the_content_aside_and_deletes_nothing(tmp_path):
  work = tmp_path / "run"
  runtime.prepare_workdir(work, fresh=True)  # creates it; nothing to move
  assert work.is_dir() and list(work.iterdir()) == []
  (work / "metrics.jsonl").write_text("x")
  (work / "checkpoints").mkdir()
  runtime.prepare_workdir(work, fresh=False)  # resuming: untouched
  assert sorted(p.name for p in work.iterdir()) == ["checkpoints", "metrics.jsonl"]
  runtime.prepare_workdir(work, fresh=True)
  runtime.prepare_workdir(work, fresh=True)  # only old-* left: nothing to move again
  (old,) = work.iterdir()
  assert old.name.startswith("old-")
  assert sorted(p.name for p in old.iterdir()) == ["checkpoints", "metrics.jsonl"]
  assert (old / "metrics.jsonl").read_text() == "x"


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


def test_stop_flag_is_set_by_sigterm_and_uninstalls():
  flag = runtime.StopFlag()
  before = signal.getsignal(signal.SIGTERM)
  flag.install()
  try:
    assert not flag and flag.agreed() is None
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag and flag.reason == "SIGTERM" and flag.agreed() == "SIGTERM"
  finally:
    flag.uninstall()
  assert signal.getsignal(signal.SIGTERM) is before


def test_stop_flag_keeps_one_record_of_the_signal_and_a_second_ctrl_c_aborts():
  flag = runtime.StopFlag()
  assert (flag.signum, flag.reason, bool(flag)) == (0, None, False)
  flag._handler(signal.SIGINT, None)
  assert (flag.signum, flag.reason, bool(flag)) == (signal.SIGINT, "SIGINT", True)
  flag.signum = int(signal.SIGTERM)  # the name follows the number: one source of truth
  assert flag.reason == "SIGTERM" and flag.agreed() == "SIGTERM"
  with pytest.raises(KeyboardInterrupt):
    flag._handler(signal.SIGINT, None)
