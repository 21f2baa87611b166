"""The periodic actions of the training loop (`sedd_jax.training.hooks`) on hand-made metrics;
the unigram baseline of the loss curve on a prepared store."""

import math
import types

import numpy as np
import pytest

from helpers import train_config
from sedd_jax.data import tokenizers
from sedd_jax.training import hooks
from sedd_jax.training import metrics as metrics_lib


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


def test_unigram_baseline_is_the_training_residue_frequencies_over_the_validation_split(store):
  """Add-one frequencies of the 25 residue letters in the training split; the mean -log p of
  the validation split's residues."""
  row = hooks.unigram_baseline(train_config(store))
  train, valid = (np.load(store / split / "tokens.npy") for split in ("train", "valid"))
  ids = list(tokenizers.ProteinTokenizer().encode(tokenizers.RESIDUES))
  counts = {i: int((train == i).sum()) + 1 for i in ids}
  total = sum(counts.values())
  expected = -np.mean([math.log(counts[int(t)] / total) for t in valid])
  assert row["unigram_per_token"] == pytest.approx(expected, rel=1e-12)
  assert (row["train_tokens"], row["valid_tokens"]) == (train.size, valid.size)
  assert row["store"] == str(store)


def test_spread_reads_evenly_spaced_slices_of_a_large_split():
  tokens = np.arange(1000)
  parts = hooks._spread(tokens, cap=100, pieces=4)
  assert [(p[0], p.size) for p in parts] == [(0, 25), (325, 25), (650, 25), (975, 25)]
  assert all(np.array_equal(p, np.arange(p[0], p[0] + 25)) for p in parts)
  (whole,) = hooks._spread(tokens, cap=1000)
  assert whole is tokens


def test_write_baseline_once_per_store_and_only_for_protein_models(tmp_path, store):
  cfg = train_config(store)

  def run(token_keys):
    return types.SimpleNamespace(primary=True, cfg=cfg, step=6,
                                 built=types.SimpleNamespace(task=types.SimpleNamespace(
                                     token_keys=token_keys)),
                                 writer=metrics_lib.MetricsWriter(tmp_path, cfg))

  for keys in (("tokens",), ("tokens",), ("tokens", "ligand_tokens")):
    r = run(keys)
    hooks.write_baseline(r)
    r.writer.close()
  rows = metrics_lib.read_metrics(tmp_path / metrics_lib.METRICS_FILE)
  assert [(r["kind"], r["step"]) for r in rows] == [("baseline", 6)]
  assert rows[0]["unigram_per_token"] == pytest.approx(
      hooks.unigram_baseline(cfg)["unigram_per_token"], rel=1e-6)  # 7 significant digits
