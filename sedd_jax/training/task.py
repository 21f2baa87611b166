"""What the generic train/eval step needs to know about a model and its loss: a `Task`.

The jitted steps of `sedd_jax.training.step` (shardings, accumulation, NaN skipping,
optimizer, EMA) are shared by every model; a task supplies the rest:

  task = get_task(cfg)                      # dispatch on cfg.get("task", "sedd")
  model = task.build_model(seed)            # an nnx.Module, initialised from seed
  tx = task.wrap_optimizer(make_optimizer(cfg))
  draw = task.draw(key, batch, step)        # the step's randomness for the global batch
  loss, aux = task.loss(model, rows, draw.shared, key_a, step)    # per micro-batch a
  sums = task.eval_loss(model, batch, key)  # sums over the batch's sequences
  write = task.sample_hook(...)             # samples during training (optional)

The step splits `draw.rows` (every array (B, ...), batch arrays included) into micro-batches
(rows j * accum + a form micro-batch a), passes `draw.shared` unchanged to each, and gives
micro-batch a the keys `fold_in(draw.loss_key, a)` (loss) and `fold_in(draw.dropout_key, a)`
(dropout). A task whose randomness is drawn per sequence in `draw` (SEDD: t and a corruption
key per row) therefore gets a loss independent of `accum` and of the device count.

Tasks (registry `TASKS`, name = `cfg.task`):
  sedd            `sedd_jax.training.sedd_task.SeddTask`: protein-only SEDD (configs/uniref50.py).
  protein_ligand  `sedd_jax.protein_ligand.task.ProteinLigandTask`: the dual-track model and
                  its training modes (configs/protein_ligand.py).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import jax
import ml_collections
import optax

from sedd_jax.data import pipeline

Array = jax.Array

TASKS = {
  "sedd": "sedd_jax.training.sedd_task:SeddTask",
  "protein_ligand": "sedd_jax.protein_ligand.task:ProteinLigandTask",
}


@dataclasses.dataclass(frozen=True)
class Draw:
  """The randomness of one train step, drawn once for the global batch.

  Attributes:
    rows: {name: (B, ...) array}: per-sequence inputs of the loss (the batch's arrays and any
      per-sequence noise), split into micro-batches by the step.
    shared: a pytree given unchanged to every micro-batch's loss (None if unused).
    loss_key: base key of the micro-batch loss keys (`fold_in(loss_key, a)`); None if unused.
    dropout_key: base key of the micro-batch dropout streams (`fold_in(dropout_key, a)`).
  """

  rows: dict[str, Array]
  shared: Any
  loss_key: Array | None
  dropout_key: Array


@dataclasses.dataclass(frozen=True)
class Task:
  """Base of the tasks: the config, the batch layout and the defaults (see the module docstring).

  Attributes:
    cfg: the run's config.
    name: the registry name (`cfg.task`).
    batch_keys: the batch arrays the step takes, each (B, ...) and sharded over 'data'.
    length_keys: the (B,) int arrays counting real tokens (their sum = real tokens).
    token_keys: the (B, L) token arrays (their size = padded tokens).
  """

  cfg: ml_collections.ConfigDict
  name: str = "sedd"
  batch_keys: tuple[str, ...] = ("tokens", "lengths")
  length_keys: tuple[str, ...] = ("lengths",)
  token_keys: tuple[str, ...] = ("tokens",)

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "Task":
    return cls(cfg)

  def build_model(self, seed: int | None = None):
    """The model, parameters from `seed` (default cfg.seed), dropout stream from seed + 1."""
    raise NotImplementedError

  def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """The optimizer the step uses, given the config's (default: unchanged)."""
    return tx

  def draw(self, key: Array, batch: dict[str, Array], step: Array) -> Draw:
    """The step's randomness for the global batch (`batch`: {k: (B, ...)} of `batch_keys`)."""
    raise NotImplementedError

  def loss(self, model, rows: dict[str, Array], shared: Any, key: Array | None,
           step: Array) -> tuple[Array, dict[str, Array]]:
    """Loss of one micro-batch (model in train mode).

    Returns:
      (() float32 mean loss over the micro-batch's sequences (what is differentiated),
       aux {"loss_sum": () sum of the per-sequence losses, **extra () float32 metrics}). Extra
       metrics are averaged over micro-batches and logged steps; NaN = not measured this step.
    """
    raise NotImplementedError

  def eval_loss(self, model, batch: dict[str, Array], key: Array) -> dict[str, Array]:
    """Validation sums over the batch (model in eval mode): {"loss": sum over sequences,
    **other per-sequence metric sums, "n_seqs": (), "n_tokens": ()}; divided by n_seqs
    (loss also by n_tokens) when reported."""
    raise NotImplementedError

  def sample_hook(self, built, options: dict, cache, writer, workdir, primary: bool):
    """The writer of the task's samples during training, or None (the default: no samples).

    Args: `built` the job's `step.Setup`; `options` its compiler options; `cache` its
    `run.CompileCache`; `writer` its `metrics.MetricsWriter`; `workdir`; `primary` (process 0).
    Returns `write(state, validation batches, key, step)`, which samples with the EMA weights
    and (process 0) writes `<workdir>/samples/step_<step>.*`. Every process calls it at the same
    step with the same global inputs (the sampler may be a collective).
    """
    del built, options, cache, writer, workdir, primary
    return None

  def count_tokens(self, batch: dict[str, Any]) -> tuple[Any, Any]:
    """(padded, real) token counts of a batch (numpy or jax arrays)."""
    real = sum(batch[k].astype("float32").sum() for k in self.length_keys)
    padded = sum(batch[k].size for k in self.token_keys)
    return padded, real


PACK_KEYS = pipeline.PACK_KEYS  # what pad_to="pack" adds to a batch


def packing_keys(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The batch arrays packed rows add (`PACK_KEYS`) when cfg.data.pad_to == "pack", else ()."""
  data = cfg.get("data")
  return PACK_KEYS if data is not None and data.get("pad_to", "full") == "pack" else ()


def task_name(cfg: ml_collections.ConfigDict) -> str:
  """`cfg.task` (default "sedd"); ValueError naming the known tasks otherwise."""
  name = cfg.get("task", "sedd")
  if name not in TASKS:
    raise ValueError(f"task {name!r} is unknown; choose one of {tuple(TASKS)}")
  return name


def get_task(cfg: ml_collections.ConfigDict) -> Task:
  """The task of `cfg` (`cfg.task`, default "sedd"), built by its `from_config` (which may fill
  derived config keys, e.g. the ligand vocabulary, so the config is self-contained)."""
  module, cls = TASKS[task_name(cfg)].split(":")
  return getattr(importlib.import_module(module), cls).from_config(cfg)
