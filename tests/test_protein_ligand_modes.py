"""Protein-ligand training modes: losses and masks per mode, which parameters each mode trains,
and a few optimizer steps per mode."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import LIGAND_TOKENS, PL_LL as LL, PL_LP as LP  # the test sizes
from helpers import protein_ligand_config as tiny_cfg
from helpers import protein_ligand_batch as make_batch
from helpers import protein_ligand_model as make_model
from sedd_jax.protein_ligand import model as pl_model
from sedd_jax.protein_ligand import modes

log = logging.getLogger(__name__)

# One compiled program per function for every mode: the mode is a traced index (the `all`
# mode's switch); the fixed-mode path (`cfg.mode = <mode>`) is covered by `_loss_per_mode`.
CFG = tiny_cfg("all")
IDX = {m: i for i, m in enumerate(modes.MODES)}


@nnx.jit
def _loss_i(model, batch, key, index):
  return modes.indexed_loss_fn(model, batch, key, 0, CFG, index)


# Optimizers are part of the compiled step's static structure: build them once.
TX = modes.skip_unused_updates(optax.adam(3e-3))
PLAIN_ADAM = optax.adam(1e-2)
WRAPPED_ADAM = modes.skip_unused_updates(PLAIN_ADAM)


@nnx.jit
def _train_step(model, optimizer, batch, key, step, index):
  """One Adam step in mode MODES[index]; returns (loss, the step's gradients)."""
  (loss, _), grads = nnx.value_and_grad(
      lambda m: modes.indexed_loss_fn(m, batch, key, step, CFG, index), has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, grads


def _grads_i(model, batch, key, index):
  """Gradients of mode MODES[index] at the model's parameters (the compiled train step, run on
  a throwaway copy of the model)."""
  copy = nnx.clone(model)
  optimizer = nnx.Optimizer(copy, TX, wrt=nnx.Param)
  return _train_step(copy, optimizer, batch, key, jnp.asarray(0),
                     jnp.asarray(index, jnp.int32))[1]


@nnx.jit
def _loss_all(model, batch, key):
  return modes.loss_fn(model, batch, key, 0, CFG)


@nnx.jit
def _loss_per_mode(model, batch, key):
  """loss_fn with cfg.mode set to each fixed mode (one trace holding the five)."""
  return {m: modes.loss_fn(model, batch, key, 0, tiny_cfg(m)) for m in modes.MODES}


def group_norms(grads) -> dict[str, float]:
  """{parameter group: sum of |grad|}, plus per-layer entries `<group>.<n>` for the cross
  groups."""
  out = {}
  for g in pl_model.GROUPS:
    if g in grads:
      out[g] = float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(grads[g])))
  for g in ("protein_cross", "ligand_cross"):
    if g in grads:
      for n in grads[g]:
        out[f"{g}.{n}"] = float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(grads[g][n])))
  return out


# Parameter groups that must get exactly zero gradient in each mode (all others nonzero, except
# the cross-attention of the last layer in the conditional modes, checked separately).
ZERO_GROUPS = {
    "protein_only": {"ligand_embed", "ligand_blocks", "ligand_cross", "ligand_output",
                     "protein_cross"},
    "ligand_only": {"protein_embed", "protein_blocks", "protein_cross", "protein_output",
                    "ligand_cross"},
    "ligand_given_protein": {"protein_output"},
    "protein_given_ligand": {"ligand_output"},
    "joint": set(),
}


@pytest.fixture(scope="module")
def model():
  return make_model(CFG)


@pytest.mark.parametrize("mode", modes.MODES)
def test_gradients_reach_only_the_parameters_a_mode_uses(model, mode):
  norms = group_norms(_grads_i(model, make_batch(), jax.random.PRNGKey(0), IDX[mode]))
  for g in pl_model.GROUPS:
    if g in ZERO_GROUPS[mode]:
      assert norms[g] == 0.0, (mode, g, norms[g])
    else:
      assert norms[g] > 0.0, (mode, g)
  last = CFG.model.n_blocks - 1
  if mode == "ligand_given_protein":  # the last protein update feeds nothing that is scored
    assert norms[f"protein_cross.{last}"] == 0.0 and norms["protein_cross.0"] > 0.0
  if mode == "protein_given_ligand":
    assert norms[f"ligand_cross.{last}"] == 0.0 and norms["ligand_cross.0"] > 0.0


def test_fixed_mode_losses_and_metrics(model):
  batch = make_batch()
  key = jax.random.PRNGKey(0)
  per_mode = _loss_per_mode(model, batch, key)
  for mode, (loss, metrics) in per_mode.items():
    assert loss.shape == () and np.isfinite(loss) and loss > 0
    assert set(metrics) == {"loss", "protein_loss", "ligand_loss", "mode"}
    assert int(metrics["mode"]) == IDX[mode]
    scored_p = mode in ("protein_only", "protein_given_ligand", "joint")
    scored_l = mode in ("ligand_only", "ligand_given_protein", "joint")
    assert (float(metrics["protein_loss"]) > 0) == scored_p, mode
    assert (float(metrics["ligand_loss"]) > 0) == scored_l, mode
    if mode == "joint":
      np.testing.assert_allclose(loss, (metrics["protein_loss"] + metrics["ligand_loss"]) / 2,
                                 rtol=1e-6)
    # The indexed (switch) path computes the same loss.
    np.testing.assert_allclose(_loss_i(model, batch, key, IDX[mode])[0], loss, rtol=1e-5)


@pytest.mark.parametrize("mode", modes.MODES)
def test_padding_does_not_change_the_loss(model, mode):
  batch = make_batch()
  loss, _ = _loss_i(model, batch, jax.random.PRNGKey(0), IDX[mode])
  noisy = {k: v.copy() for k, v in batch.items()}
  rng = np.random.default_rng(5)
  pad_p = np.arange(LP) >= batch["lengths"][:, None]
  pad_l = np.arange(LL) >= batch["ligand_lengths"][:, None]
  noisy["tokens"][pad_p] = rng.integers(0, 32, pad_p.sum())
  noisy["ligand_tokens"][pad_l] = rng.integers(0, LIGAND_TOKENS, pad_l.sum())
  loss2, _ = _loss_i(model, noisy, jax.random.PRNGKey(0), IDX[mode])
  np.testing.assert_allclose(loss2, loss, rtol=1e-5)


def test_mode_all_switches_per_step(model):
  batch = make_batch()
  seen = {}
  for i in range(40):
    key = jax.random.PRNGKey(i)
    loss, metrics = _loss_all(model, batch, key)
    m = int(metrics["mode"])
    assert m == int(modes.draw_mode(jax.random.split(key)[0], CFG))
    seen.setdefault(m, (key, float(loss)))
  assert sorted(seen) == list(range(len(modes.MODES)))
  # The drawn mode's loss is that mode's own loss with the same (split) key.
  for m, (key, loss) in seen.items():
    own, _ = _loss_i(model, batch, jax.random.split(key)[1], m)
    np.testing.assert_allclose(loss, own, rtol=1e-5)


def test_mode_weights_and_bad_modes():
  cfg = tiny_cfg("all", frozen=False)
  cfg.mode_weights = (0.0, 0.0, 1.0, 0.0, 0.0)
  draws = {int(modes.draw_mode(jax.random.PRNGKey(i), cfg)) for i in range(30)}
  assert draws == {IDX["ligand_given_protein"]}
  cfg.mode_weights = (1.0, 1.0)
  with pytest.raises(ValueError, match="mode_weights"):
    modes.check_mode(cfg)
  cfg = tiny_cfg("protein_and_ligand")
  with pytest.raises(ValueError, match="not a training mode"):
    modes.loss_fn(None, make_batch(), jax.random.PRNGKey(0), 0, cfg)
  bad = make_batch()
  del bad["ligand_lengths"]
  with pytest.raises(ValueError, match="ligand_lengths"):
    modes.loss_fn(None, bad, jax.random.PRNGKey(0), 0, tiny_cfg("joint"))


@nnx.jit
def _eval_all(model, batch, key):
  return modes.eval_loss_fn(model, batch, key, CFG)


def test_eval_loss_fn(model):
  out = _eval_all(model, make_batch(), jax.random.PRNGKey(0))
  assert set(out) == {"loss"} | {f"loss/{m}" for m in modes.MODES}
  np.testing.assert_allclose(out["loss"], np.mean([out[f"loss/{m}"] for m in modes.MODES]),
                             rtol=1e-6)


@nnx.jit
def _eval_i(model, batch, keys, index):
  graphdef, state = nnx.split(model)

  def one(k):  # fresh Variables at this trace level (nnx.switch writes its state back)
    m = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    return modes.indexed_loss_fn(m, batch, k, 0, CFG, index)[0]

  return jax.lax.map(one, keys).mean()


def train_tiny_check(mode, steps=30, seed=0, eval_keys=8, tx=TX):
  """Trains a fresh tiny model (zero-initialised heads/gates as in real training) for `steps`
  Adam steps (lr 3e-3, wrapped in `skip_unused_updates`) on one fixed batch in `mode` (a mode
  of MODES, or `all`: a mode drawn per step).

  Returns (first, last, model): the mean loss over `eval_keys` fixed keys, before and after
  (for `all`: the mean of the five modes' losses).
  """
  model = make_model(CFG, seed=seed, random=False)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  batch = make_batch()
  eval_modes = modes.MODES if mode == modes.ALL else (mode,)
  keys = jax.random.split(jax.random.PRNGKey(1234), eval_keys)

  def evaluate():
    return float(np.mean([_eval_i(model, batch, keys, jnp.asarray(IDX[m], jnp.int32))
                          for m in eval_modes]))

  first = evaluate()
  for i in range(steps):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    if mode == modes.ALL:
      k_mode, key = jax.random.split(key)
      index = modes.draw_mode(k_mode, CFG)
    else:
      index = jnp.asarray(IDX[mode], jnp.int32)  # the same signature as draw_mode's: one compile
    _train_step(model, optimizer, batch, key, jnp.asarray(i), index)
  return first, evaluate(), model


@pytest.mark.parametrize("mode", modes.MODES + (modes.ALL,))
def test_a_few_adam_steps_lower_the_loss(mode):
  first, last, _ = train_tiny_check(mode)
  log.info("mode %s: loss %.3f -> %.3f", mode, first, last)
  assert np.isfinite(last) and last < first, (mode, first, last)


@nnx.jit
def _update(model, optimizer, grads):
  optimizer.update(model, grads)


def test_skip_unused_updates_freezes_unused_parameters():
  """After a joint step (Adam moments everywhere), a protein_only step must leave the ligand
  track alone; plain Adam would move it by momentum."""
  batch = make_batch()
  results = {}
  for wrap in (True, False):
    model = make_model(CFG, random=True)
    optimizer = nnx.Optimizer(model, WRAPPED_ADAM if wrap else PLAIN_ADAM, wrt=nnx.Param)
    _update(model, optimizer, _grads_i(model, batch, jax.random.PRNGKey(0), IDX["joint"]))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param)["ligand_blocks"])
    grads = _grads_i(model, batch, jax.random.PRNGKey(1), IDX["protein_only"])
    assert group_norms(grads)["ligand_blocks"] == 0.0
    _update(model, optimizer, grads)
    after = nnx.state(model, nnx.Param)["ligand_blocks"]
    results[wrap] = max(float(np.abs(np.asarray(a) - b).max())
                        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))
  assert results[True] == 0.0 and results[False] > 0.0
