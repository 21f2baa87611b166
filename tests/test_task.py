"""Tests of sedd_jax.training.task: the Task protocol, its defaults and the task registry."""

import dataclasses
import importlib

import numpy as np
import optax
import pytest

from helpers import load_config
from sedd_jax.training import sedd_task as sedd_task_lib
from sedd_jax.training import task as task_lib

REQUIRED = ("build_model", "draw", "loss", "eval_loss")  # what a task must implement


def test_the_base_task_requires_the_model_the_draw_and_the_losses():
  task = task_lib.Task(load_config())
  calls = {"build_model": (), "draw": (None, {}, 0), "loss": (None, {}, None, None, 0),
           "eval_loss": (None, {}, None)}
  assert set(calls) == set(REQUIRED)
  for name, args in calls.items():
    with pytest.raises(NotImplementedError):
      getattr(task, name)(*args)
  tx = optax.sgd(0.1)
  assert task.wrap_optimizer(tx) is tx
  assert task.sample_hook(None, {}, None, None, None, True) is None
  assert (task.name, task.batch_keys) == ("sedd", ("tokens", "lengths"))
  with pytest.raises(dataclasses.FrozenInstanceError):
    task.name = "other"


def test_count_tokens_is_padded_size_and_real_length_sum_over_the_tracks():
  batch = {"tokens": np.ones((3, 8), np.int32), "lengths": np.array([8, 5, 1], np.int32),
           "ligand_tokens": np.ones((3, 4), np.int32),
           "ligand_lengths": np.array([4, 2, 0], np.int32)}
  assert task_lib.Task(load_config()).count_tokens(batch) == (24, 14.0)
  two = task_lib.Task(load_config(), length_keys=("lengths", "ligand_lengths"),
                      token_keys=("tokens", "ligand_tokens"))
  assert two.count_tokens(batch) == (36, 20.0)


@pytest.mark.parametrize("name", sorted(task_lib.TASKS))
def test_every_registered_task_implements_the_protocol(name):
  module, cls = task_lib.TASKS[name].split(":")
  task_cls = getattr(importlib.import_module(module), cls)
  assert issubclass(task_cls, task_lib.Task)
  for member in REQUIRED:
    assert getattr(task_cls, member) is not getattr(task_lib.Task, member), (name, member)


def test_task_name_and_get_task():
  cfg = load_config()
  assert task_lib.task_name(cfg) == "sedd"
  task = task_lib.get_task(cfg)
  assert type(task) is sedd_task_lib.SeddTask and task.graph.dim == 33
  assert task_lib.packing_keys(cfg) == ()
  packed = load_config(overrides={"data.pad_to": "pack"})
  assert task_lib.packing_keys(packed) == ("segment_ids", "positions")
  cfg.task = "nope"
  with pytest.raises(ValueError, match=r"task 'nope' is unknown; choose one of \('sedd', "
                                       r"'protein_ligand'\)"):
    task_lib.get_task(cfg)
