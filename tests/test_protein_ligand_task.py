"""The protein-ligand Task of the generic trainer: per-step mode draws, per-mode loss rows
(NaN for the modes a step did not run), eval sums and token counts of both tracks, and the
optimizer wrapper that leaves unused parameters alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import PL_B as B  # the test batch's rows
from helpers import protein_ligand_batch as make_batch
from helpers import protein_ligand_config as tiny_cfg
from helpers import protein_ligand_model as make_model
from sedd_jax.protein_ligand import modes
from sedd_jax.protein_ligand.task import ProteinLigandTask


@pytest.fixture(scope="module")
def task():
  return ProteinLigandTask.from_config(tiny_cfg("all"))


def test_from_config_names_the_batch_keys_of_both_tracks(task):
  assert task.name == "protein_ligand" and task.batch_keys == modes.BATCH_KEYS
  batch = make_batch()
  padded, real = task.count_tokens(batch)
  assert padded == batch["tokens"].size + batch["ligand_tokens"].size
  assert float(real) == batch["lengths"].sum() + batch["ligand_lengths"].sum()


def test_draw_shares_one_mode_per_step_only_for_mode_all(task):
  batch = make_batch()
  drawn = {int(task.draw(jax.random.key(s), batch, 0).shared) for s in range(40)}
  assert drawn == set(range(len(modes.MODES)))  # uniform weights: every mode within 40 steps
  draw = task.draw(jax.random.key(0), batch, 0)
  assert set(draw.rows) == set(modes.BATCH_KEYS)
  fixed = ProteinLigandTask.from_config(tiny_cfg("joint"))
  assert fixed.draw(jax.random.key(0), batch, 0).shared is None


def test_loss_rows_are_nan_but_for_the_step_mode():
  cfg = tiny_cfg("ligand_given_protein", frozen=False)
  cfg.model.n_blocks = 1  # one mode, one block: a cheap eager loss
  task = ProteinLigandTask.from_config(cfg)
  model = make_model(cfg)
  rows = {k: jnp.asarray(v) for k, v in make_batch().items()}
  index = modes.MODES.index("ligand_given_protein")
  loss, aux = nnx.jit(lambda m, r, k: task.loss(m, r, None, k, 3))(model, rows, jax.random.key(1))
  assert float(aux["loss_sum"]) == pytest.approx(float(loss) * B, rel=1e-6)
  for i, name in enumerate(modes.MODES):
    value = float(aux[f"loss/{name}"])
    assert (value == pytest.approx(float(loss))) if i == index else np.isnan(value), name
  sums = nnx.jit(task.eval_loss)(model, rows, jax.random.key(2))
  assert float(sums["n_seqs"]) == B
  assert float(sums["n_tokens"]) == float(task.count_tokens(rows)[1])
  assert float(sums["loss"]) > 0 and set(sums) >= {"loss", "ligand_loss", "protein_loss"}


def test_wrap_optimizer_gives_unused_parameters_no_update(task):
  tx = task.wrap_optimizer(optax.adamw(0.1, weight_decay=0.5))
  params = {"used": jnp.ones((2,)), "unused": jnp.ones((2,))}
  state = tx.init(params)
  grads = {"used": jnp.ones((2,)), "unused": jnp.zeros((2,))}
  updates, _ = tx.update(grads, state, params)
  assert float(jnp.abs(updates["unused"]).max()) == 0.0  # no weight decay either
  assert float(jnp.abs(updates["used"]).min()) > 0.0
