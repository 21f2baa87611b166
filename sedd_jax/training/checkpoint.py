"""Orbax checkpoints of training runs: resume, corrupt-checkpoint fallback, inference loading.

On-disk format (format 1). A run's checkpoints live in `<workdir>/checkpoints/<step>/`, one
orbax composite checkpoint per step (written to a temporary folder and renamed when complete,
so a crash never leaves a half-written `<step>/`). Items:

  params/     orbax PyTree (StandardSave) of the model's `nnx.Param` values as a PURE nested dict:
              `nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])`, e.g.
              {'blocks': {0: {'attn_qkv': {'kernel': array}}, ...}} (float32).
  ema/        the same tree for the EMA parameters (used for sampling and evaluation).
  opt_state/  the optax state (training checkpoints only).
  train/      JSON {"format": 1, "step": int, "bad_steps": int, "skipped": int, "rng": [u32, u32]}.
  data/       JSON {"encoding": "json" | "utf8" | "none", "value": ...}: the grain iterator's
              `get_state()` (a dict, or JSON bytes stored as text).
  config/     JSON: `cfg.to_dict()` (the file orbax writes is `config/metadata`).

Only `config` and one of `ema`/`params` are needed for inference: `save_inference_checkpoint`
writes such a params-only checkpoint (e.g. for weights converted from PyTorch by
`sedd_jax.convert`), and `load_for_inference` reads either kind. A plain `config.json` beside
the items (or in a parent folder) is accepted when the `config` item is missing.

Retention: the newest `cfg.training.keep` checkpoints, plus every step that is a multiple of
`cfg.training.milestone_every` (milestones, kept forever; 0 = none). Saving is asynchronous;
`wait()` blocks until everything is on disk.

Resume: `restore_latest` tries the newest step first; a checkpoint that fails to load is
reported (step and path) and moved aside to `<workdir>/checkpoints_corrupt/<step>-<time>/` (never
deleted) once an older one has loaded. If no checkpoint loads, it raises (usually a config that
no longer matches the checkpoints) and moves nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sedd_jax import config as config_lib
from sedd_jax.training import step as step_lib
from sedd_jax.training.state import TrainState

logger = logging.getLogger(__name__)

FORMAT = 1
CHECKPOINTS = "checkpoints"
CORRUPT = "checkpoints_corrupt"


class CheckpointError(RuntimeError):
  """No usable checkpoint (message names the paths and the errors)."""


def _abstract(tree: Any, shardings: Any | None = None) -> Any:
  """ShapeDtypeStructs (with shardings when given) for every array leaf of `tree`."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _pure(state: Any) -> dict:
  """A pure nested dict of an nnx.State (or a dict unchanged)."""
  return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state


def _fill(template: nnx.State, pure: dict) -> nnx.State:
  """A copy of the nnx.State `template` with values from the pure dict `pure`."""
  out = jax.tree.map(lambda x: x, template)
  nnx.replace_by_pure_dict(out, pure)
  return out


def encode_data_state(state: Any) -> dict:
  """A grain iterator state (dict, bytes or None) -> JSON-able dict."""
  if state is None:
    return {"encoding": "none", "value": None}
  if isinstance(state, (bytes, bytearray)):
    return {"encoding": "utf8", "value": bytes(state).decode("utf-8")}
  return {"encoding": "json", "value": state}


def decode_data_state(d: dict | None) -> Any:
  """Inverse of `encode_data_state`."""
  if not d or d.get("encoding") == "none":
    return None
  if d["encoding"] == "utf8":
    return d["value"].encode("utf-8")
  return d["value"]


@dataclasses.dataclass
class Restored:
  """What `restore_latest` returns."""

  state: TrainState
  data_state: Any
  step: int
  config: ml_collections.ConfigDict | None
  path: pathlib.Path


class Checkpointer:
  """Saves and restores TrainStates under `<workdir>/checkpoints` (see the module docstring)."""

  def __init__(self, workdir: str | os.PathLike, keep: int = 3, milestone_every: int = 0,
               async_save: bool = True):
    self.workdir = pathlib.Path(workdir).absolute()
    self.directory = self.workdir / CHECKPOINTS
    self.keep = int(keep)
    self.milestone_every = int(milestone_every)
    self.async_save = async_save
    self._manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    policies = [ocp.checkpoint_managers.LatestN(n=self.keep)]
    if self.milestone_every > 0:
      policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=self.milestone_every))
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=self.async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    return ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_path(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def save(self, state: TrainState, data_state: Any, cfg: ml_collections.ConfigDict) -> bool:
    """Writes a checkpoint at `state.step` (asynchronously); False if that step exists."""
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return False
    train_meta = {
      "format": FORMAT,
      "step": step,
      "bad_steps": int(jax.device_get(state.bad_steps)),
      "skipped": int(jax.device_get(state.skipped)),
      "rng": [int(v) for v in np.asarray(jax.device_get(state.rng)).reshape(-1)],
    }
    args = ocp.args.Composite(
      params=ocp.args.StandardSave(_pure(state.params)),
      ema=ocp.args.StandardSave(_pure(state.ema)),
      opt_state=ocp.args.StandardSave(state.opt_state),
      train=ocp.args.JsonSave(train_meta),
      data=ocp.args.JsonSave(encode_data_state(data_state)),
      config=ocp.args.JsonSave(json.loads(config_lib.to_json(cfg))),
    )
    self._manager.save(step, args=args, force=True)
    logger.debug("checkpoint: saving step %d to %s", step, self.step_path(step))
    return True

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def restore(self, step: int, template: TrainState, shardings: TrainState | None = None
              ) -> Restored:
    """Loads step `step` into the structure of `template` (placed with `shardings`)."""
    sh = shardings if shardings is not None else TrainState(*([None] * 7))
    params_t = _abstract(_pure(template.params),
                         None if sh.params is None else _pure(sh.params))
    ema_t = _abstract(_pure(template.ema), None if sh.ema is None else _pure(sh.ema))
    opt_t = _abstract(template.opt_state, sh.opt_state)
    r = self._manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(params_t),
      ema=ocp.args.StandardRestore(ema_t),
      opt_state=ocp.args.StandardRestore(opt_t),
      train=ocp.args.JsonRestore(),
      data=ocp.args.JsonRestore(),
      config=ocp.args.JsonRestore(),
    ))
    meta = r.train
    if meta.get("format") != FORMAT or meta.get("step") != step:
      raise CheckpointError(f"{self.step_path(step)}: train item {meta!r} does not match step "
                            f"{step} / format {FORMAT}")

    def scalar(v, s):
      a = jnp.asarray(v, jnp.int32)
      return step_lib.put_global(a, s) if s is not None else a

    rng = np.asarray(meta["rng"], np.uint32).reshape(np.shape(template.rng))
    state = TrainState(
      step=scalar(step, sh.step),
      params=_fill(template.params, r.params) if isinstance(template.params, nnx.State)
      else r.params,
      opt_state=r.opt_state,
      ema=_fill(template.ema, r.ema) if isinstance(template.ema, nnx.State) else r.ema,
      rng=step_lib.put_global(rng, sh.rng) if sh.rng is not None else jnp.asarray(rng),
      bad_steps=scalar(meta["bad_steps"], sh.bad_steps),
      skipped=scalar(meta["skipped"], sh.skipped),
    )
    cfg = config_lib.from_dict(r.config) if r.config else None
    return Restored(state=state, data_state=decode_data_state(r.data), step=step, config=cfg,
                    path=self.step_path(step))

  def restore_latest(self, template: TrainState, shardings: TrainState | None = None
                     ) -> Restored | None:
    """The newest checkpoint that loads; None if there is none. Bad ones are reported and,
    once an older one has loaded, moved aside to `<workdir>/checkpoints_corrupt/`."""
    steps = self.all_steps()
    if not steps:
      return None
    failed: list[tuple[int, str]] = []
    for step in reversed(steps):
      try:
        restored = self.restore(step, template, shardings)
      except Exception as e:  # noqa: BLE001 -- any failure to read means "unusable"
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logger.error("checkpoint at step %d (%s) cannot be loaded: %s; trying the previous one",
                     step, self.step_path(step), msg)
        failed.append((step, msg))
        continue
      if failed:
        self._move_aside([s for s, _ in failed])
      return restored
    details = "; ".join(f"step {s} ({self.step_path(s)}): {m}" for s, m in failed)
    raise CheckpointError(f"no checkpoint in {self.directory} could be loaded ({details}). If the "
                          "config changed since they were written, restore it, or start over with "
                          "--fresh.")

  def _move_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      dest_root = self.workdir / CORRUPT
      dest_root.mkdir(parents=True, exist_ok=True)
      for step in steps:
        src = self.step_path(step)
        dest = dest_root / f"{step}-{stamp}"
        shutil.move(str(src), str(dest))
        logger.error("moved unusable checkpoint %s to %s", src, dest)
    step_lib.barrier("sedd_jax.checkpoint: unusable checkpoints moved aside")
    self._manager.close()
    self._manager = self._make_manager()


# ----------------------------------------------------------------------------------------------
# Inference checkpoints.


def _composite_checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_inference_checkpoint(path: str | os.PathLike, params: Any,
                              cfg: ml_collections.ConfigDict, ema: Any | None = None) -> None:
  """Writes a params-only checkpoint folder `path` (items params, ema, config; see top).

  Use `path = <dir>/checkpoints/<step>` so that `load_for_inference(<dir>)` finds it.
  `params`/`ema` are nnx.States or pure dicts (ema defaults to params).
  """
  path = pathlib.Path(path).absolute()
  ema = params if ema is None else ema
  ckpt = _composite_checkpointer()
  ckpt.save(path, args=ocp.args.Composite(
    params=ocp.args.StandardSave(_pure(params)),
    ema=ocp.args.StandardSave(_pure(ema)),
    config=ocp.args.JsonSave(json.loads(config_lib.to_json(cfg))),
  ))


def read_items(step_dir: str | os.PathLike,
               items: tuple[str, ...] = ("params", "ema", "train", "data", "config")) -> dict:
  """The raw content of a checkpoint's items (JSON items as dicts; arrays as saved, on this
  process's first device whatever topology wrote them, e.g. several processes)."""
  step_dir = pathlib.Path(step_dir).absolute()
  json_items = {"train", "data", "config"}
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def arrays(item):
    meta = ocp.StandardCheckpointHandler().metadata(step_dir / item)
    return ocp.args.StandardRestore(jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta))

  args = {k: ocp.args.JsonRestore() if k in json_items else arrays(k) for k in items}
  restored = _composite_checkpointer().restore(step_dir, args=ocp.args.Composite(**args))
  return {k: restored[k] for k in items}


def _step_dirs(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()),
                key=lambda p: int(p.name))


def _is_step_dir(p: pathlib.Path) -> bool:
  return (p / "ema").is_dir() or (p / "params").is_dir()


def resolve_checkpoint_dirs(path: str | os.PathLike) -> list[pathlib.Path]:
  """Step folders for `path` (a workdir, its `checkpoints/`, or one step), newest first."""
  p = pathlib.Path(path).absolute()
  if not p.exists():
    raise FileNotFoundError(f"{p} does not exist")
  if _is_step_dir(p):
    return [p]
  if (p / CHECKPOINTS).is_dir():
    p = p / CHECKPOINTS
  dirs = [d for d in reversed(_step_dirs(p)) if _is_step_dir(d)]
  if not dirs:
    raise FileNotFoundError(f"no checkpoint in {p} (expected <step>/ema or <step>/params)")
  return dirs


def _read_config(step_dir: pathlib.Path) -> ml_collections.ConfigDict:
  item = step_dir / "config"
  if item.is_dir():
    restored = _composite_checkpointer().restore(
      step_dir, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_lib.from_dict(restored.config)
  for folder in (step_dir, *step_dir.parents[:3]):
    if (folder / "config.json").is_file():
      return config_lib.from_dict(json.loads((folder / "config.json").read_text()))
  raise FileNotFoundError(f"{step_dir}: no config item and no config.json")


def load_for_inference(path_or_workdir: str | os.PathLike, use_ema: bool = True):
  """Loads a model for sampling/evaluation from a workdir, a `checkpoints/` folder or a step.

  Returns:
    (model, cfg, graph, noise): the model of the config's task (`cfg.task`: a DDiT, or for
    "protein_ligand" a ProteinLigandDDiT) in eval mode holding the EMA weights (or `params`
    when `use_ema` is False or the checkpoint has no EMA), its ConfigDict, and the diffusion
    graph (`cfg.graph`: the protein track's; the ligand graph is
    `sedd_jax.protein_ligand.get_graphs(cfg)[1]`) and noise schedule built from the config. The
    newest checkpoint that loads is used; a corrupt one is reported and skipped.
  """
  from sedd_jax import diffusion
  from sedd_jax.training.task import get_task

  errors = []
  for step_dir in resolve_checkpoint_dirs(path_or_workdir):
    try:
      cfg = _read_config(step_dir)
      graph = diffusion.get_graph(cfg.graph)
      noise = diffusion.get_noise(cfg.noise)
      model = get_task(cfg).build_model()
      _, params_t, _ = nnx.split(model, nnx.Param, ...)
      item = "ema" if use_ema and (step_dir / "ema").is_dir() else "params"
      # Placed on this process's first device: the checkpoint may come from another topology
      # (e.g. trained on 8 devices, sampled on 1), which orbax's saved shardings would need.
      pure = nnx.to_pure_dict(params_t)
      one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = _abstract(pure, jax.tree.map(lambda _: one, pure))
      restored = _composite_checkpointer().restore(
        step_dir, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
      nnx.update(model, _fill(params_t, restored[item]))
      model.eval()
      logger.info("loaded %s weights from %s", item, step_dir)
      return model, cfg, graph, noise
    except Exception as e:  # noqa: BLE001
      logger.error("checkpoint %s cannot be loaded: %s: %s; trying the previous one", step_dir,
                   type(e).__name__, e)
      errors.append(f"{step_dir}: {type(e).__name__}: {e}")
  raise CheckpointError("no loadable checkpoint: " + "; ".join(errors))
