"""Tests of sedd_jax.training.sedd_task: the draws, the loss against the diffusion's loss
functions on the same draws, packed rows, the validation sums."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import FAST, STEP_B as B, STEP_L as L  # the train step's batch
from helpers import randomize
from helpers import step_batch as host_batch
from helpers import step_config as micro_config
from sedd_jax import diffusion
from sedd_jax.data import tokenizers
from sedd_jax.training import sedd_task as sedd_task_lib
from sedd_jax.training import state as state_lib
from sedd_jax.training import task as task_lib

SIGMA_SCALE = {"curriculum.kind": "sigma_scale", "curriculum.preschool_time": 10}


@pytest.fixture(scope="module")
def model():
  m = randomize(state_lib.build_model(micro_config(), diffusion.get_graph(micro_config().graph)))
  m.eval()
  return m


def test_draw_splits_the_key_into_times_row_keys_and_dropout():
  """key -> (k_t, k_x, k_drop): t = sample_time(k_t), row i's key = split(k_x, B)[i]."""
  cfg = micro_config(**{"training.accum": 2})
  task = sedd_task_lib.SeddTask.from_config(cfg)
  key = jax.random.key(7)
  batch = {k: jnp.asarray(v) for k, v in host_batch().items()}
  draw = task.draw(key, batch, jnp.int32(3))
  k_t, k_x, k_drop = jax.random.split(key, 3)
  np.testing.assert_array_equal(draw.rows["t"], diffusion.sample_time(k_t, B, 1e-3))
  np.testing.assert_array_equal(draw.rows["row_keys"],
                                jax.random.key_data(jax.random.split(k_x, B)))
  np.testing.assert_array_equal(jax.random.key_data(draw.dropout_key), jax.random.key_data(k_drop))
  assert draw.loss_key is None and set(draw.rows) == {"tokens", "lengths", "t", "row_keys"}
  corrupt, scale, share = draw.shared
  assert float(corrupt) == float(scale) == 1.0 and float(share) == B / 2  # sequences / accum


@pytest.mark.parametrize("curriculum", [{}, SIGMA_SCALE])
def test_loss_equals_the_diffusion_loss_on_the_same_draws(model, curriculum):
  """task.loss = sum over rows of score_entropy_loss(model(perturb(row key, x0, t))) / (B / accum),
  with the curriculum's factor c on sigma (c = 0.1 + 0.9 * 3 / 10 at step 3 of 10)."""
  cfg = micro_config(**curriculum)
  task = sedd_task_lib.SeddTask.from_config(cfg)
  graph, noise = task.graph, task.noise
  batch = {k: jnp.asarray(v) for k, v in host_batch(1).items()}
  step = jnp.int32(3)
  c = 0.37 if curriculum else 1.0

  graphdef, params = nnx.split(model)

  def both(params, rows, shared):
    model = nnx.merge(graphdef, params)
    got, aux = task.loss(model, rows, shared, None, step)
    x0, lengths, t = batch["tokens"], batch["lengths"], rows["t"]
    keys = jax.random.wrap_key_data(rows["row_keys"])
    x = jnp.concatenate([diffusion.perturb(keys[i], graph, noise, x0[i:i + 1], t[i:i + 1],
                                           sigma_scale=c) for i in range(B)])
    log_score = model(x, noise.total_noise(t) * c, lengths)
    weight = jnp.arange(L)[None] < lengths[:, None]
    per_seq = diffusion.score_entropy_loss(graph, noise, log_score, x, x0, t, weight,
                                           sigma_scale=c)
    return got, aux["loss_sum"], per_seq

  draw = task.draw(jax.random.key(1), batch, step)
  np.testing.assert_allclose(float(draw.shared[0]), c, rtol=1e-6)
  got, loss_sum, per_seq = jax.jit(both, compiler_options=FAST)(params, draw.rows, draw.shared)
  np.testing.assert_allclose(float(loss_sum), float(per_seq.sum()), rtol=1e-5)
  np.testing.assert_allclose(float(got), float(per_seq.mean()), rtol=1e-5)


def test_eval_loss_sums_sequences_and_tokens(model):
  cfg = micro_config(**SIGMA_SCALE)  # no curriculum in validation
  task = sedd_task_lib.SeddTask.from_config(cfg)
  batch = {k: jnp.asarray(v) for k, v in host_batch(2).items()}
  key = jax.random.key(4)
  graphdef, params = nnx.split(model)
  t, row_keys, _, cs, ls = sedd_task_lib.draw_noise(key, B, jnp.int32(0),
                                                    diffusion.Curriculum(kind="none"), 1e-3)

  def both(params):
    model = nnx.merge(graphdef, params)
    return task.eval_loss(model, batch, key), sedd_task_lib.sequence_losses(
        model, task.graph, task.noise, batch["tokens"], batch["lengths"], t, row_keys, cs, ls)

  sums, per_seq = jax.jit(both, compiler_options=FAST)(params)
  assert float(cs) == float(ls) == 1.0
  np.testing.assert_allclose(float(sums["loss"]), float(per_seq.sum()), rtol=1e-6)
  assert float(sums["n_seqs"]) == B
  assert float(sums["n_tokens"]) == float(np.sum(host_batch(2)["lengths"]))


def test_packed_loss_equals_unpacked_loss():
  """Same sequences, same t, same corrupted tokens: per-sequence sums and their mean agree."""
  cfg = micro_config(**{"data.pad_to": "pack"})
  task = sedd_task_lib.SeddTask.from_config(cfg)
  assert task.batch_keys == ("tokens", "lengths", "segment_ids", "positions")
  assert sedd_task_lib.SeddTask.from_config(micro_config()).batch_keys == ("tokens", "lengths")
  model = randomize(state_lib.build_model(cfg, task.graph))
  model.eval()
  rng = np.random.default_rng(0)
  lens = (9, 5, 12)
  x0 = [rng.integers(4, 24, n).astype(np.int32) for n in lens]
  x = [np.where(rng.random(n) < 0.5, task.graph.mask, s).astype(np.int32)
       for n, s in zip(lens, x0)]
  packed = {k: np.zeros((1, L), np.int32) for k in ("x", "x0", "segment_ids", "positions")}
  packed["x"][:], packed["x0"][:] = tokenizers.PAD_ID, tokenizers.PAD_ID
  alone = {k: np.full((3, L), tokenizers.PAD_ID, np.int32) for k in ("x", "x0")}
  start = 0
  for i, n in enumerate(lens):
    sl = slice(start, start + n)
    packed["x"][0, sl], packed["x0"][0, sl] = x[i], x0[i]
    packed["segment_ids"][0, sl], packed["positions"][0, sl] = i + 1, np.arange(n)
    alone["x"][i, :n], alone["x0"][i, :n] = x[i], x0[i]
    start += n
  t = 0.6

  @nnx.jit
  def losses(model, x, x0, lengths, t, segment_ids=None, positions=None):
    sigma = task.noise.total_noise(t)
    extra = {} if segment_ids is None else dict(segment_ids=segment_ids, positions=positions)
    score = model(x, sigma, lengths, **extra)
    weight = jnp.arange(L)[None] < lengths[:, None]
    return diffusion.score_entropy_loss(task.graph, task.noise, score, x, x0, t, weight,
                                        segment_ids=segment_ids, num_segments=16)

  got = losses(model, packed["x"], packed["x0"], jnp.array([sum(lens)]), jnp.full((1,), t),
               packed["segment_ids"], packed["positions"])
  want = losses(model, alone["x"], alone["x0"], jnp.array(lens), jnp.full((3,), t))
  assert got.shape == (1, 16) and np.all(np.asarray(got[0, 3:]) == 0)
  np.testing.assert_allclose(got[0, :3], want, rtol=1e-5, atol=1e-5)
  n = sedd_task_lib.sequence_count(packed["x0"], jnp.asarray(packed["segment_ids"]))
  np.testing.assert_allclose(got.sum() / n, np.mean(want), rtol=1e-5)
  # the task's validation sums count sequences, not rows
  batch = {"tokens": packed["x0"], "lengths": np.array([sum(lens)], np.int32),
           "segment_ids": packed["segment_ids"], "positions": packed["positions"]}
  sums = nnx.jit(task.eval_loss)(model, batch, jax.random.key(0))
  assert float(sums["n_seqs"]) == 3 and float(sums["n_tokens"]) == sum(lens)
  assert np.isfinite(float(sums["loss"]))
  assert task_lib.packing_keys(cfg) == ("segment_ids", "positions")
