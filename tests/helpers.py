"""Set-up shared by the test files: paths, compile options, tiny configs, parity cases, checks.

A plain module (`import helpers`: pytest puts tests/ on sys.path) rather than conftest fixtures:
most of these are needed at import time (module constants, `parametrize` lists, subprocess
arguments), where fixtures cannot reach, and an import says where a name comes from. Fixtures
that several files share (prepared stores, a tiny checkpoint) are in conftest.py and use these.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sedd_jax import config as config_lib
from sedd_jax import diffusion
from sedd_jax import parity
from sedd_jax.data import tokenizers

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository
DATA = ROOT / "tests" / "data"
FAA = DATA / "pyhmmer_938293_first200.faa"  # 200 proteins (with stop codons)
PAIRS = DATA / "pairs_first60.csv"  # 60 protein-ligand pairs
UNIREF50 = ROOT / "configs" / "uniref50.py"

# XLA without optimisation passes: 2-3x faster CPU compiles of the tests' tiny programs, same
# semantics. FAST is `compiler_options=` of jit / train(); FAST_XLA_FLAG the same for a
# subprocess's XLA_FLAGS.
FAST = {"xla_backend_optimization_level": 0}
FAST_XLA_FLAG = "--xla_backend_optimization_level=0"

# The smallest DDiT the tests train: one block of width 32.
MICRO_MODEL = {"model.hidden_size": 32, "model.n_heads": 2, "model.n_blocks": 1,
               "model.cond_dim": 16}


def ddit_config(**kw) -> ml_collections.ConfigDict:
  """A DDiT `model` sub-config: two blocks of width 16, length 16, float32, xla attention, no
  dropout or remat, the sigma-scaled output; `kw` replaces entries."""
  return ml_collections.ConfigDict({
      **dict(hidden_size=16, n_heads=2, n_blocks=2, cond_dim=8, dropout=0.0, scale_by_sigma=True,
             length=16, attention="xla", attention_chunk=0, dtype="float32", remat="none"),
      **kw})


def rkey(seed: int) -> jax.Array:
  """A PRNG key. The functions under test work with any key implementation; `rbg` keys compile
  their draws ~10x faster than threefry on the CPU, which keeps these tests quick."""
  return jax.random.key(seed, impl="rbg")


def load_config(spec: str = "uniref50.py:tiny", overrides=()) -> ml_collections.ConfigDict:
  """configs/<spec> ("file.py[:variant]") through `config.load_config` (validated), with
  `overrides` ({dotted key: value} or ["key=value", ...])."""
  return config_lib.load_config(str(ROOT / "configs" / spec), overrides)


def config_module(name: str) -> types.ModuleType:
  """The module configs/<name>.py; its `get_config(variant)` is an unvalidated ConfigDict."""
  spec = importlib.util.spec_from_file_location(f"{name}_config", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def subprocess_env(devices: int | None = None, fast: bool = False, **extra: str) -> dict:
  """os.environ for a CLI in a subprocess on the CPU, with the `extra` variables. With `devices`
  or `fast`, XLA_FLAGS are `devices` simulated devices (None: one) and, if `fast`,
  FAST_XLA_FLAG; with neither, this process's (conftest's 8 devices)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [f"--xla_force_host_platform_device_count={devices}"] if devices else []
  if devices or fast:
    env["XLA_FLAGS"] = " ".join(flags + ([FAST_XLA_FLAG] if fast else []))
  env.update(extra)
  return env


def randomize(model, seed: int = 0, scale: float = 0.3):
  """Replaces every parameter with random values (the zero inits hide most of the network)."""
  rng = np.random.default_rng(seed)
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      v = var.get_value()
      var.set_value(jnp.asarray(scale * rng.standard_normal(v.shape), v.dtype))
  return model


@nnx.jit
def grads_and_out(model, idx, sigma, lengths):
  """A DDiT's (d/dparams sum(tanh(log score)), log score)."""
  def loss(m):
    out = m(idx, sigma, lengths)
    return jnp.sum(jnp.tanh(out)), out
  return nnx.grad(loss, has_aux=True)(model)


def ddit_out_and_grads(**kw) -> tuple[jax.Array, list[jax.Array]]:
  """(log score, parameter gradients) of a randomized `ddit_config(**kw)` DDiT (vocabulary 9,
  absorbing) in eval mode, on one fixed small batch (2 rows of 8, one padded): for comparing
  model options that must not change the numbers."""
  from sedd_jax.model import DDiT
  model = randomize(DDiT(ddit_config(**kw), 9, True, nnx.Rngs(0)))
  model.eval()
  idx = jax.random.randint(jax.random.key(2), (2, 8), 0, 9)
  grads, out = grads_and_out(model, idx, jnp.array([0.4, 1.9]), jnp.array([8, 6], jnp.int32))
  return out, jax.tree.leaves(nnx.state(grads, nnx.Param))


def assert_trees_equal(a, b) -> None:
  """Two non-empty pytrees with the same number of leaves, equal leaf by leaf (exactly)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- attention ----

def qkv(b: int, l: int, h: int, d: int, seed: int = 0, dtype=jnp.float32) -> list[jax.Array]:
  """Random q, k, v of shape (b, l, h, d) in `dtype`."""
  ks = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (b, l, h, d), jnp.float32).astype(dtype) for k in ks]


def real_positions(lengths: jax.Array, l: int) -> jax.Array:
  """(B, L, 1, 1) float mask of real (query) positions."""
  return (jnp.arange(l)[None, :] < lengths[:, None]).astype(jnp.float32)[:, :, None, None]


# ---- the sampler on a toy problem (test_sampler, test_first_hitting) ----

TOY_V, TOY_L = 3, 3  # toy vocabulary and length: 27 sequences
TOY_GRAPH = diffusion.Absorbing(TOY_V)
TOY_NOISE = diffusion.LogLinear(eps=1e-3)


def compiled_sampler(score_fn, shape, graph=TOY_GRAPH, noise=TOY_NOISE, **kw):
  """`sampler.jit_sampler` (FAST): run(key, fixed_tokens, fixed_mask, lengths, allowed) for a
  fixed setting."""
  from sedd_jax.sampling import sampler  # noqa: PLC0415

  return sampler.jit_sampler(graph, noise, shape, score_fn=score_fn, compiler_options=FAST, **kw)


def run_sampler(score_fn, shape, seed=0, graph=TOY_GRAPH, noise=TOY_NOISE, fixed_tokens=None,
                fixed_mask=None, lengths=None, allowed=None, **kw):
  """One compiled_sampler run from key `seed`, its outputs as numpy arrays."""
  run = compiled_sampler(score_fn, shape, graph, noise, **kw)
  out = run(jax.random.key(seed), fixed_tokens, fixed_mask, lengths, allowed)
  return jax.tree.map(np.asarray, out)


def spy_predictors(monkeypatch) -> list[str]:
  """The `predictor` of every `sampler.sample` trace from now on (in order); the spy runs the
  real sampler."""
  from sedd_jax.sampling import sampler  # noqa: PLC0415

  seen, real = [], sampler.sample

  def spy(*args, **kwargs):
    seen.append(kwargs.get("predictor", "analytic"))
    return real(*args, **kwargs)

  monkeypatch.setattr(sampler, "sample", spy)
  return seen


# ---- parity fixtures (shared/parity, $SEDD_PARITY_FIXTURES) ----

def cases(kind: str) -> list:
  """pytest.param(fixture_path, output_name) for every output of every fixture of `kind`.

  Unreadable fixtures are reported by tests/test_parity.py, not skipped here.
  """
  params = []
  for path in parity.fixture_paths():
    try:
      fx = parity.load_fixture(path)
    except parity.FixtureError:
      continue
    if fx.kind != kind:
      continue
    for out in sorted(fx.outputs):
      params.append(pytest.param(path, out, id=f"{path.parent.name}/{path.stem}:{out}"))
  return params


def noise_from_meta(meta: dict):
  """The noise schedule a fixture's meta describes."""
  return diffusion.get_noise(dict(type=meta["noise"], eps=meta.get("eps", 1e-3),
                                  sigma_min=meta.get("sigma_min", 1e-4),
                                  sigma_max=meta.get("sigma_max", 1.0)))


def graph_from_meta(meta: dict):
  """The graph a fixture's meta describes."""
  return diffusion.get_graph(dict(type=meta["graph"], tokens=meta["tokens"]))


# ---- data ----

def pipeline_config(store_path, length: int = 64, **data) -> ml_collections.ConfigDict:
  """configs/uniref50.py:tiny (unvalidated) of model length `length` on the bundled FASTA
  prepared at `store_path` (conftest's faa_store), then the `data` entries."""
  cfg = config_module("uniref50").get_config("tiny")
  cfg.model.length = length
  cfg.data.fasta = str(FAA)
  cfg.data.prepared = str(store_path)
  cfg.data.update(data)
  return cfg


def write_text(path: pathlib.Path, text: str) -> pathlib.Path:
  """`text` written to `path`; returns `path`."""
  path.write_text(text)
  return path


def random_fasta(path: pathlib.Path, n: int = 400, seed: int = 0, lines: bool = True
                 ) -> list[str]:
  """Writes `n` random sequences of 30..199 standard residues (`s<i>` records, 60 residues a
  line if `lines`) to `path`; returns the sequences."""
  rng = np.random.default_rng(seed)
  seqs = ["".join(rng.choice(list(tokenizers.STANDARD_RESIDUES), rng.integers(30, 200)))
          for _ in range(n)]
  text = "".join(f">s{i} n=1 Tax=x\n" + (s[:60] + "\n" + s[60:] if lines else s) + "\n"
                 for i, s in enumerate(seqs))
  path.write_text(text)
  return seqs


# ---- the protein task: micro training runs and tiny checkpoints ----

# A micro training run on the bundled FASTA: a few steps of the smallest model.
TRAIN_MICRO = {
  **MICRO_MODEL, "model.length": 32, "model.dropout": 0.1, "training.batch_size": 8,
  "training.steps": 6, "training.log_every": 1, "training.eval_every": 0,
  "training.sample_every": 0, "training.ckpt_every": 100, "training.eval_batches": 2,
  "training.num_samples": 2, "sampling.steps": 4, "optim.warmup": 2, "data.valid_fraction": 0.1,
  "wandb.mode": "disabled",
}


def train_config(store_path: pathlib.Path, **over) -> ml_collections.ConfigDict:
  """The micro training config (TRAIN_MICRO, validated) on the bundled FASTA prepared at
  `store_path`, then the dotted-key overrides `over` (not validated: train() checks them)."""
  return config_lib.apply_overrides(load_config(overrides=TRAIN_MICRO), {
      "data.fasta": str(FAA), "data.prepared": str(store_path), **over})


def train_command(workdir: pathlib.Path, store_path: pathlib.Path, **over) -> list[str]:
  """The command line `python -m sedd_jax.train` of train_config(store_path, **over)."""
  over = {**TRAIN_MICRO, "data.fasta": str(FAA), "data.prepared": str(store_path), **over}
  return [sys.executable, "-m", "sedd_jax.train", f"--config={UNIREF50}:tiny",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in over.items())]


# The train step's batch: B rows of width L (the micro model at length L).
STEP_B, STEP_L = 8, 32


def step_config(**over) -> ml_collections.ConfigDict:
  """The micro model (MICRO_MODEL) at length STEP_L, batch STEP_B, no dropout or warm-up, lr 1e-3
  (validated), then the dotted-key overrides `over`."""
  cfg = load_config(overrides={**MICRO_MODEL, "model.length": STEP_L, "model.dropout": 0.0,
                               "training.batch_size": STEP_B, "optim.warmup": 0, "optim.lr": 1e-3})
  return config_lib.apply_overrides(cfg, over)


def step_batch(seed: int = 0) -> dict[str, np.ndarray]:
  """A host batch of STEP_B random rows (ids 4..23) of random lengths 8..STEP_L, PAD after."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, 24, size=(STEP_B, STEP_L)).astype(np.int32)
  lengths = rng.integers(8, STEP_L + 1, size=(STEP_B,)).astype(np.int32)
  for i in range(STEP_B):
    tokens[i, lengths[i]:] = 1
  return {"tokens": tokens, "lengths": lengths}


def checkpoint_config() -> ml_collections.ConfigDict:
  """The micro model (MICRO_MODEL) at length 32, batch 8: the checkpoint tests' training state."""
  return load_config(overrides={**MICRO_MODEL, "model.length": 32, "training.batch_size": 8})


def state_at(state, step: int, seed: int = 0):
  """`state` at `step` with parameters/EMA/moments shifted so that steps are distinguishable."""
  bump = lambda t: jax.tree.map(lambda x: x + jnp.asarray(step + seed, x.dtype), t)
  return state.replace(step=jnp.int32(step), params=bump(state.params), ema=bump(state.ema),
                       opt_state=bump(state.opt_state), skipped=jnp.int32(1))


def sample_config(tmp: pathlib.Path, hidden: int = 32) -> ml_collections.ConfigDict:
  """configs/uniref50.py:tiny with a one-block model of length 48 and 6 sampling steps, its
  data the bundled FASTA prepared in `tmp`/prep (unvalidated)."""
  cfg = config_module("uniref50").get_config("tiny")
  cfg.model.update(hidden_size=hidden, n_heads=2, n_blocks=1, cond_dim=16, length=48)
  cfg.data.update(fasta=str(FAA), prepared=str(tmp / "prep"))
  cfg.sampling.steps = 6
  return cfg


def save_checkpoint(path: pathlib.Path, cfg, stored_cfg=None, seed: int = 0,
                    random_output: bool = True) -> pathlib.Path:
  """A run folder `path` with the inference checkpoint of a fresh model; its output weights are
  random unless `random_output` is False (then zero, as initialised: a uniform prediction over
  the non-mask tokens)."""
  from sedd_jax.training import checkpoint as ckpt_lib  # noqa: PLC0415
  from sedd_jax.training import state as state_lib  # noqa: PLC0415

  graph = diffusion.get_graph(cfg.graph)
  model = state_lib.build_model(cfg, graph, seed=seed)
  if random_output:  # so that the samples depend on the seed and the weights
    model.output_layer.linear.kernel[...] = np.random.default_rng(seed).normal(
        size=model.output_layer.linear.kernel.shape).astype(np.float32)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  ckpt_lib.save_inference_checkpoint(path / "checkpoints" / "0", params, stored_cfg or cfg)
  return path


def read_records(path) -> list[tuple[str, str]]:
  """(header line without '>', sequence) of each record of a FASTA file the CLIs wrote (one
  sequence line per record)."""
  recs = []
  for block in pathlib.Path(path).read_text().split(">")[1:]:
    head, seq = block.strip().split("\n")
    recs.append((head, seq))
  return recs


def cli_fails(main, args, caplog, match: str) -> None:
  """`main(args)` exits 2 with an error log containing `match`."""
  caplog.clear()
  with caplog.at_level(logging.ERROR):
    assert main(args) == 2
  assert match in caplog.text, caplog.text


# ---- the protein-ligand model ----

# Batch, protein and ligand lengths of the protein-ligand tests; ligand ids 0..3 are specials,
# 4..39 SMILES tokens (ligand D = 41 with the mask).
PL_B, PL_LP, PL_LL = 4, 16, 10
LIGAND_TOKENS = 40


def protein_ligand_config(mode: str | None = None, frozen: bool = True, n_blocks: int = 2):
  """configs/protein_ligand.py:tiny at the test sizes (blocks of width 32, float32, xla
  attention, LIGAND_TOKENS ligand ids, 8 sampling steps), training `mode` (None: the
  variant's); `frozen`: a FrozenConfigDict (hashable, a static jit argument), else editable."""
  cfg = config_module("protein_ligand").get_config("tiny")
  cfg.model.update(hidden_size=32, n_heads=2, n_blocks=n_blocks, cond_dim=16, dropout=0.0,
                   dtype="float32", attention="xla")
  cfg.ligand.graph.tokens = LIGAND_TOKENS
  if mode is not None:
    cfg.mode = mode
  cfg.sampling.steps = 8
  return ml_collections.FrozenConfigDict(cfg) if frozen else cfg


def protein_ligand_sampling():
  """(config, protein graph, ligand graph, noise) of the sampling tests (conditional, joint):
  protein_ligand_config("all") with one block (half the compile time)."""
  cfg = protein_ligand_config("all", n_blocks=1)
  return (cfg, diffusion.Absorbing(32), diffusion.Absorbing(LIGAND_TOKENS),
          diffusion.get_noise(cfg.noise))


def _add_noise(model, seed: int = 1, scale: float = 0.3):
  """Adds noise to every parameter, so that zero-initialised gates and heads are live."""
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(seed)
  new = [jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype)
         for x in leaves]
  nnx.update(model, jax.tree.unflatten(treedef, new))
  return model


def protein_ligand_model(cfg=None, seed: int = 0, random: bool = True):
  """The dual-track model of `cfg` (default protein_ligand_config()), with noise added to its
  parameters when `random`."""
  from sedd_jax.protein_ligand import model as pl_model  # noqa: PLC0415

  model = pl_model.build_model(cfg or protein_ligand_config(), nnx.Rngs(seed))
  return _add_noise(model) if random else model


def protein_ligand_batch(seed: int = 0) -> dict[str, np.ndarray]:
  """A fixed batch with padding on both tracks: numpy arrays as the pipeline yields them."""
  rng = np.random.default_rng(seed)
  plen = np.array([PL_LP, 9, 5, 12], np.int32)
  llen = np.array([PL_LL, 3, 7, 6], np.int32)
  p = rng.integers(4, 29, (PL_B, PL_LP)).astype(np.int32)
  lig = rng.integers(4, LIGAND_TOKENS, (PL_B, PL_LL)).astype(np.int32)
  p[np.arange(PL_LP) >= plen[:, None]] = 1
  lig[np.arange(PL_LL) >= llen[:, None]] = 1
  return {"tokens": p, "lengths": plen, "ligand_tokens": lig, "ligand_lengths": llen}
