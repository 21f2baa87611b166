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


def assert_trees_equal(a, b) -> None:
  """Two non-empty pytrees with the same number of leaves, equal leaf by leaf (exactly)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- parity fixtures (shared/parity, $SEDD_PARITY_FIXTURES) ----

def cases(kind: str) -> list:
  """pytest.param(fixture_path, output_name) for every output of every fixture of `kind`.

  Unreadable fixtures are reported by tests/test_parity_files.py, not skipped here.
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
