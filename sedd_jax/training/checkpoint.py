"""The checkpoint format: its errors, validation of a step folder, reading, inference checkpoints.

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

The training run's checkpoints (save, retention, resume with the corrupt-checkpoint fallback)
are `sedd_jax.training.checkpointer.Checkpointer`'s; this module is the format's reading side:
the errors, `check_files` / `unreadable_reason` (is a checkpoint damaged, and where),
`saved_shape_changes` (does it fit a model), `read_config`, `read_items`, the inference
checkpoints (`save_inference_checkpoint`, `load_inference_checkpoint` -> `InferenceCheckpoint`
with the step folder it came from, `load_for_inference`), and the tree helpers both sides use
(`pure_dict`, `fill`, `abstract_arrays`).

A restore of a damaged checkpoint fails on its first bad read while orbax's other reads are in
flight: orbax closes its event loop with them pending, so TensorStore's completions find the
loop closed and the pending read coroutines turn the GeneratorExit of their collection into an
exception; the interpreter printed each as a traceback ("Exception ignored in: <coroutine
...>", or a bare "RuntimeError: Event loop is closed") whenever it came, dozens per damaged
checkpoint. A failed save (a full disk) leaves the same "Event loop is closed" callbacks of
its writes still in flight, raised in TensorStore's threads.
`_drop_abandoned_reads` (a `sys.unraisablehook` filter installed on import) drops exactly those
leftovers, as `_DropUnretrievedReadErrors` drops asyncio's log of the reads that failed in
time; the first error is the one reported (the file and the problem).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pathlib
import sys
import threading
import types
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from sedd_jax import config as config_lib

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


class CheckpointError(RuntimeError):
  """No usable checkpoint (message names the paths and the errors)."""


class UnreadableCheckpoint(CheckpointError):
  """A checkpoint with a missing, truncated or malformed file; the message names the file."""


class ShapeMismatch(CheckpointError):
  """A checkpoint of another model shape than the config builds; names the keys that differ."""


ITEMS = ("params", "ema", "opt_state", "train", "data", "config")
# orbax's JSON files of a step folder and of each item (array_metadatas/* are JSON as well).
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")
# TensorStore status codes of a missing, truncated or undecodable file. Other codes
# (UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED, ...) are not the checkpoint's fault.
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")


def unreadable_reason(error: BaseException) -> str | None:
  """One line naming the file and the problem when `error` (or an error it chains from) says a
  checkpoint's files are missing, truncated or malformed; None for any other error (an I/O
  error, out of memory, a bug), which must not be mistaken for a corrupt checkpoint."""
  seen = set()
  e = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, UnreadableCheckpoint):
      return str(e)
    if isinstance(e, FileNotFoundError):
      return f"{e.filename}: missing" if e.filename else str(e)
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, EOFError)):
      return f"malformed file ({type(e).__name__}: {e})"
    if isinstance(e, ValueError) and str(e).split(":", 1)[0] in _DAMAGE_CODES:
      return str(e).split(" [tensorstore_spec=", 1)[0]  # the error, without TensorStore's spec
    e = e.__cause__ or e.__context__
  return None


class _DropUnretrievedReadErrors(logging.Filter):
  """Drops asyncio's "exception was never retrieved" record when its exception is checkpoint
  damage (`unreadable_reason`). A damaged checkpoint fails many of orbax's concurrent reads; the
  first error reaches `Checkpointer.restore_latest`, which reports the file and the problem, and
  the others are logged by asyncio whenever the garbage collector frees them, each with
  TensorStore's full spec. Every other asyncio record passes."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and "exception was never retrieved" in record.getMessage():
      return unreadable_reason(record.exc_info[1]) is None
    return True


logging.getLogger("asyncio").addFilter(_DropUnretrievedReadErrors())

_ORBAX = os.path.dirname(ocp.__file__)
_ASYNCIO = os.path.dirname(asyncio.__file__)


def _abandoned_read(unraisable) -> bool:
  """Whether an unraisable exception is the leftover of a read that orbax abandoned with its
  event loop (see the module docstring): an orbax coroutine that turned the GeneratorExit of its
  collection into an exception, or a completion (`call_soon_threadsafe` called from TensorStore's
  threads, no Python caller) that found the loop closed."""
  exc, obj = unraisable.exc_value, unraisable.object
  if isinstance(obj, types.CoroutineType):
    return (obj.cr_code.co_filename.startswith(_ORBAX)
            and isinstance(exc.__context__, GeneratorExit))
  if not (obj is None and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
    return False
  if isinstance(threading.current_thread(), threading._DummyThread):  # noqa: SLF001
    return True  # raised in a thread Python did not start: TensorStore's (reads and writes)
  tb = unraisable.exc_traceback
  return (tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"
          and tb.tb_frame.f_code.co_filename.startswith(_ASYNCIO))


def _drop_abandoned_reads(previous):
  """A `sys.unraisablehook` passing everything but `_abandoned_read`s on to `previous`."""

  def hook(unraisable) -> None:
    try:
      drop = _abandoned_read(unraisable)
    except Exception:  # noqa: BLE001 -- e.g. at interpreter exit: report it as before
      drop = False
    if not drop:
      previous(unraisable)

  return hook


sys.unraisablehook = _drop_abandoned_reads(sys.unraisablehook)


def check_files(step_dir: pathlib.Path, items: tuple[str, ...] = ITEMS) -> None:
  """Raises UnreadableCheckpoint naming the first missing item folder or malformed JSON file of
  the checkpoint `step_dir` (orbax's metadata; array data is checked when read)."""
  for item in items:
    if not (step_dir / item).is_dir():
      raise UnreadableCheckpoint(f"{step_dir / item} is missing")
  files = [step_dir / _JSON_FILES[0]]
  for item in items:
    files += [step_dir / item / n for n in _JSON_FILES[1:]]
    files += sorted((step_dir / item / "array_metadatas").glob("*"))
  for f in files:
    if not f.is_file():
      continue
    try:
      json.loads(f.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
      raise UnreadableCheckpoint(f"{f} is not valid JSON (truncated or overwritten?): {e}") from None


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{dotted path: shape} of the leaves of `tree` (arrays, or orbax's array metadata)."""

  def name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)

  return {name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def saved_shape_changes(step_dir: pathlib.Path, item: str, tree: Any) -> list[str]:
  """'ITEM PATH: saved SHAPE, now SHAPE' for each array of `tree` whose shape differs from the
  one saved in item `item` of `step_dir` (read from orbax's metadata, not the arrays)."""
  saved = _shapes(ocp.StandardCheckpointHandler().metadata(step_dir / item))
  now = _shapes(tree)
  return [f"{item} {k}: saved {saved.get(k, 'absent')}, now {now.get(k, 'absent')}"
          for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)]


def abstract_arrays(tree: Any, shardings: Any | None = None) -> Any:
  """ShapeDtypeStructs (with shardings when given) for every array leaf of `tree`."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def pure_dict(state: Any) -> dict:
  """A pure nested dict of an nnx.State (or a dict unchanged)."""
  return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state


def fill(template: nnx.State, pure: dict) -> nnx.State:
  """A copy of the nnx.State `template` with values from the pure dict `pure`."""
  out = jax.tree.map(lambda x: x, template)
  nnx.replace_by_pure_dict(out, pure)
  return out


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
    params=ocp.args.StandardSave(pure_dict(params)),
    ema=ocp.args.StandardSave(pure_dict(ema)),
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


def read_config(step_dir: pathlib.Path) -> ml_collections.ConfigDict:
  """The config saved with the checkpoint `step_dir` (its `config` item, else the nearest
  config.json in it or up to 3 folders above); FileNotFoundError when there is none."""
  item = step_dir / "config"
  if item.is_dir():
    restored = _composite_checkpointer().restore(
      step_dir, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_lib.from_dict(restored.config)
  for folder in (step_dir, *step_dir.parents[:3]):
    if (folder / "config.json").is_file():
      return config_lib.from_dict(json.loads((folder / "config.json").read_text()))
  raise FileNotFoundError(f"{step_dir}: no config item and no config.json")


@dataclasses.dataclass(frozen=True)
class InferenceCheckpoint:
  """A model loaded for sampling / evaluation (`load_inference_checkpoint`).

  model: the model of the config's task (`cfg.task`: a DDiT, or for "protein_ligand" a
    ProteinLigandDDiT) in eval mode; cfg: its ConfigDict; graph, noise: the diffusion graph
    (`cfg.graph`: the protein track's; the ligand graph is
    `sedd_jax.protein_ligand.get_graphs(cfg)[1]`) and noise schedule of the config.
  step_dir: the checkpoint folder it was loaded from (absolute); weights: "ema" or "params".
  """

  model: Any
  cfg: ml_collections.ConfigDict
  graph: Any
  noise: Any
  step_dir: pathlib.Path
  weights: str

  @property
  def step(self) -> int | None:
    """The training step of the checkpoint (its folder's name), None for another name."""
    return int(self.step_dir.name) if self.step_dir.name.isdigit() else None

  @property
  def run_dir(self) -> pathlib.Path | None:
    """The run folder holding `checkpoints/<step>`, None for a checkpoint folder elsewhere."""
    return self.step_dir.parents[1] if self.step_dir.parent.name == CHECKPOINTS else None


def load_for_inference(path_or_workdir: str | os.PathLike, use_ema: bool = True):
  """(model, cfg, graph, noise) of `load_inference_checkpoint(path_or_workdir, use_ema)`."""
  c = load_inference_checkpoint(path_or_workdir, use_ema)
  return c.model, c.cfg, c.graph, c.noise


def load_inference_checkpoint(path_or_workdir: str | os.PathLike,
                              use_ema: bool = True) -> InferenceCheckpoint:
  """Loads a model for sampling/evaluation from a workdir, a `checkpoints/` folder or a step.

  The EMA weights are loaded (`params` when `use_ema` is False or the checkpoint has no EMA),
  from the newest checkpoint that loads: an unreadable one (`unreadable_reason`) is reported and
  skipped; weights of another shape than the config builds raise ShapeMismatch, no readable
  checkpoint UnreadableCheckpoint (naming each folder, the damaged file or array, the
  problem); any other error is raised.
  """
  from sedd_jax import diffusion
  from sedd_jax.training.task import get_task

  errors = []
  for step_dir in resolve_checkpoint_dirs(path_or_workdir):
    try:
      cfg = read_config(step_dir)
      graph = diffusion.get_graph(cfg.graph)
      noise = diffusion.get_noise(cfg.noise)
      model = get_task(cfg).build_model()
      _, params_t, _ = nnx.split(model, nnx.Param, ...)
      item = "ema" if use_ema and (step_dir / "ema").is_dir() else "params"
      check_files(step_dir, (item,))
      changes = saved_shape_changes(step_dir, item, nnx.to_pure_dict(params_t))
      if changes:
        raise ShapeMismatch(f"checkpoint {step_dir}: its {item} weights are of another model "
                            f"shape than its config builds ({len(changes)} arrays differ, e.g. "
                            f"{changes[0]})")
      # Placed on this process's first device: the checkpoint may come from another topology
      # (e.g. trained on 8 devices, sampled on 1), which orbax's saved shardings would need.
      pure = nnx.to_pure_dict(params_t)
      one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = abstract_arrays(pure, jax.tree.map(lambda _: one, pure))
      restored = _composite_checkpointer().restore(
        step_dir, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
      nnx.update(model, fill(params_t, restored[item]))
      model.eval()
      logger.info("loaded %s weights from %s", item, step_dir)
      return InferenceCheckpoint(model, cfg, graph, noise, step_dir, item)
    except Exception as e:
      reason = unreadable_reason(e)
      if reason is None:
        raise
      logger.error("checkpoint %s cannot be read: %s; trying the previous one", step_dir, reason)
      errors.append(f"{step_dir}: {reason}")
  raise UnreadableCheckpoint("no checkpoint can be read, the files of each are damaged "
                             "(truncated, overwritten or missing): " + "; ".join(errors))
