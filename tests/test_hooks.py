"""The periodic actions of the training loop (`sedd_jax.training.hooks`) on hand-made metrics."""

import math
import types

import pytest

from sedd_jax.training import hooks


def _m(loss, finite=True, lr=1e-3, skipped=0, **extra):
  return {"loss": loss, "loss_per_token": loss / 10, "grad_norm": 2 * loss, "lr": lr,
          "finite": finite, "bad_steps": 0 if finite else 1, "skipped": skipped, "tokens": 10.0,
          **extra}


def test_summarize_averages_the_finite_steps_and_keeps_the_last_lr():
  vals = [_m(1.0), _m(float("nan"), finite=False, skipped=1), _m(3.0, lr=2e-3, skipped=1)]
  row = hooks.summarize(vals)
  assert row == {"loss": 2.0, "loss_per_token": 0.2, "grad_norm": 4.0, "lr": 2e-3, "skipped": 1}
  only_bad = hooks.summarize([_m(float("nan"), finite=False)])  # no finite step: the bad one
  assert math.isnan(only_bad["loss"])


def test_summarize_averages_task_metrics_over_the_steps_that_measured_them():
  nan = float("nan")
  row = hooks.summarize([_m(1.0, **{"loss/a": 4.0, "loss/b": nan}),
                         _m(1.0, **{"loss/a": nan, "loss/b": nan}),
                         _m(1.0, **{"loss/a": 2.0, "loss/b": nan})])
  assert row["loss/a"] == 3.0 and "loss/b" not in row  # never measured: no column


class _Reads:
  """A stand-in for jax.device_get's input: records which step's value was read."""

  def __init__(self, step, value, log):
    self.step, self.value, self.log = step, value, log

  def __int__(self):
    self.log.append(self.step)
    return self.value


@pytest.mark.parametrize("max_bad", [3, 1])
def test_read_bad_steps_reads_the_previous_step_unless_in_a_streak(max_bad, monkeypatch):
  monkeypatch.setattr(hooks.jax, "device_get", lambda x: x)
  log = []
  run = types.SimpleNamespace(late=None, cfg=types.SimpleNamespace(
    training=types.SimpleNamespace(max_bad_steps=max_bad)))
  bad = [0, 0, 1, 2, 0]  # consecutive non-finite count after steps 1..5
  got = [hooks.read_bad_steps(run, {"bad_steps": _Reads(s, b, log)})
         for s, b in enumerate(bad, 1)]
  if max_bad == 1:  # every step's own count at once, and only that
    assert got == bad and log == [1, 2, 3, 4, 5]
  else:  # step n's count is read once step n + 1 is queued; in a streak, also its own at once
    assert got == [0, 0, 0, 2, 0] and log == [1, 2, 3, 4, 4, 5]
