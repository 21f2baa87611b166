"""The exported model bundle: one self-contained folder per trained model, no run folder needed.

  DIR/config.json        {"bundle_format": 1, "sedd_jax_version", "source": {run, checkpoint,
                         step, weights}, "vocabulary": {"protein": [...], ("ligand": [...])},
                         "config": the run's full config (graph, noise, model shape, ...)}
  DIR/model.safetensors  the model's parameters (EMA weights by default), float32 as trained,
                         one tensor per parameter under its flat dotted name
                         (`blocks.0.attn_qkv.kernel`), written by `safetensors.numpy`
  DIR/data_stats.json    the training split's length histogram and token counts per track
                         (`DataStats`), when the run's prepared data were there to read
  DIR/README.md          a model card: source, model, data, training, evaluation numbers

- `write(out, model, cfg, source=, ...)`: writes a bundle atomically (a temporary folder beside
  `out`, renamed when complete); refuses an existing file or non-bundle folder, and replaces an
  existing bundle only with `overwrite` (`check_out(out, overwrite)`: the same check alone).
- `is_bundle(path)`, `read_meta(path)`, `read_config(path)`: what a bundle is and says, without
  building the model (for checking flags before the slow load).
- `load(path)`: (model, cfg, graph, noise, meta), the model built from the config and filled from
  the safetensors file, every name, shape and dtype checked (ValueError naming the tensor).
- `flat_params(model)`: the {dotted name: array} that `write` saves.
- `DataStats`, `data_stats(cfg)`, `read_data_stats(path)`: the training data's length histogram
  and composition, read streaming from the store of `cfg.data.prepared`.
- `model_card(meta, stats, evals)`: the README text.
Errors: FileNotFoundError / ValueError naming the file, the tensor or the key.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

FORMAT = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
DATA_STATS = "data_stats.json"
README = "README.md"
FILES = (CONFIG, WEIGHTS, README)  # DATA_STATS is optional
_CHUNK = 1 << 24  # tokens per bincount chunk of the store's memory map


def version() -> str:
  """The installed sedd_jax version (`sedd_jax.__version__`, from the package metadata)."""
  import sedd_jax  # noqa: PLC0415
  return sedd_jax.__version__


# ---- the training data's statistics --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrackStats:
  """One track of a training split: `length_values (K,)` int, the distinct sequence lengths in
  increasing order, `length_counts (K,)` int, how many sequences have each, and
  `token_counts`, {token: count} over the track's vocabulary (every token, 0 included)."""

  length_values: np.ndarray
  length_counts: np.ndarray
  token_counts: dict[str, int]

  @property
  def num_sequences(self) -> int:
    return int(self.length_counts.sum())

  @property
  def num_tokens(self) -> int:
    return int((self.length_values * self.length_counts).sum())

  def draw_lengths(self, num: int, rng: np.random.Generator, max_length: int) -> np.ndarray:
    """(num,) int32 lengths drawn from the histogram (with replacement), capped at
    `max_length`."""
    p = self.length_counts / self.length_counts.sum()
    return np.minimum(rng.choice(self.length_values, num, p=p), max_length).astype(np.int32)

  def to_json(self) -> dict:
    return {"num_sequences": self.num_sequences, "num_tokens": self.num_tokens,
            "length_histogram": {"values": self.length_values.tolist(),
                                 "counts": self.length_counts.tolist()},
            "token_counts": dict(self.token_counts)}

  @classmethod
  def from_json(cls, d: Mapping[str, Any], where: str) -> "TrackStats":
    try:
      hist = d["length_histogram"]
      values = np.asarray(hist["values"], np.int64)
      counts = np.asarray(hist["counts"], np.int64)
      tokens = {str(k): int(v) for k, v in d["token_counts"].items()}
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{where}: not a track's statistics ({type(e).__name__}: {e})") from None
    if values.shape != counts.shape or values.ndim != 1 or not counts.size or (counts < 0).any():
      raise ValueError(f"{where}: length_histogram values and counts must be equal-length "
                       "non-empty lists of counts >= 0")
    return cls(values, counts, tokens)


@dataclasses.dataclass(frozen=True)
class DataStats:
  """The training split's statistics: `tracks` {track name: TrackStats} ("protein", and
  "ligand" for protein-ligand stores), `source` the store they were read from."""

  source: str
  tracks: dict[str, TrackStats]

  def to_json(self) -> dict:
    return {"source": self.source, "split": "train",
            "tracks": {k: v.to_json() for k, v in self.tracks.items()}}

  @classmethod
  def from_json(cls, d: Mapping[str, Any], where: str) -> "DataStats":
    if not isinstance(d, Mapping) or not isinstance(d.get("tracks"), Mapping):
      raise ValueError(f"{where}: expected a JSON object with 'tracks'")
    return cls(str(d.get("source", "")), {k: TrackStats.from_json(v, f"{where} tracks.{k}")
                                          for k, v in d["tracks"].items()})


def _vocabularies(cfg, store=None) -> dict[str, list[str]]:
  """{track: its tokens in id order}: the ESM-2 alphabet, and the SMILES vocabulary of a
  protein-ligand store (`store`, else the prepared data of `cfg`)."""
  from sedd_jax.data import reference  # noqa: PLC0415
  from sedd_jax.data import tokenizers  # noqa: PLC0415

  vocab = {"protein": list(tokenizers.ESM2_ALPHABET)}
  if cfg.get("task", "sedd") == "protein_ligand":
    smiles = store.smiles_tokenizer() if store is not None else reference.reference_pairs(
        cfg, "train")[1]
    vocab["ligand"] = list(smiles.vocab)
  return vocab


def data_stats(cfg) -> DataStats | None:
  """The length histogram and token counts of every track of the training split of
  `cfg.data.prepared`, its tokens read one chunk of the memory map at a time; None (with a
  warning) when there is no prepared training split."""
  from sedd_jax.data import reference  # noqa: PLC0415

  split = reference.training_split(cfg)
  if split is None:
    logger.warning("no prepared training data at %s: the bundle has no data_stats.json",
                   cfg.data.prepared)
    return None
  vocab = _vocabularies(cfg, split)
  tracks = {}
  for name in split.tracks:
    track = split.track(name)
    values, counts = np.unique(np.asarray(track.lengths), return_counts=True)
    n_ids = len(vocab.get(name, ()))
    ids = np.zeros((n_ids,), np.int64)
    for lo in range(0, track.tokens.size, _CHUNK):
      chunk = np.bincount(np.asarray(track.tokens[lo:lo + _CHUNK]), minlength=n_ids)
      if chunk.size > n_ids:
        raise ValueError(f"the {name} tokens of {split.root} hold ids >= {n_ids}, outside "
                         "its vocabulary")
      ids += chunk
    tracks[name] = TrackStats(values.astype(np.int64), counts.astype(np.int64),
                              dict(zip(vocab[name], ids.tolist())))
  return DataStats(str(split.root), tracks)


def read_data_stats(path: str | os.PathLike) -> DataStats | None:
  """The `DataStats` of the bundle at `path`, or None when it has no data_stats.json."""
  f = pathlib.Path(path) / DATA_STATS
  if not f.is_file():
    return None
  return DataStats.from_json(_read_json(f), str(f))


# ---- writing and reading ------------------------------------------------------------------


def flat_params(model) -> dict[str, np.ndarray]:
  """{flat dotted name: numpy array} of the model's `nnx.Param`s (`blocks.0.norm1.scale`)."""
  from flax import nnx  # noqa: PLC0415

  _, params, _ = nnx.split(model, nnx.Param, ...)
  return {".".join(str(k) for k in path): np.asarray(var.get_value())
          for path, var in nnx.to_flat_state(params)}


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} does not exist") from None
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def is_bundle(path: str | os.PathLike) -> bool:
  """Whether `path` is a folder whose config.json is a bundle's (has `bundle_format`)."""
  f = pathlib.Path(path) / CONFIG
  try:
    meta = json.loads(f.read_text())
  except (OSError, ValueError, UnicodeDecodeError):
    return False
  return isinstance(meta, dict) and "bundle_format" in meta


def read_meta(path: str | os.PathLike) -> dict:
  """The bundle's config.json, checked: its format, and `config` an object."""
  f = pathlib.Path(path) / CONFIG
  meta = _read_json(f)
  if not isinstance(meta, dict) or "bundle_format" not in meta:
    raise ValueError(f"{f} is not a sedd_jax bundle's config.json (no bundle_format)")
  if meta["bundle_format"] != FORMAT:
    raise ValueError(f"{f}: bundle_format {meta['bundle_format']!r}; this sedd_jax "
                     f"({version()}) reads format {FORMAT}")
  for key in ("config", "vocabulary", "source"):
    if not isinstance(meta.get(key), dict):
      raise ValueError(f"{f}: '{key}' must be a JSON object")
  return meta


def read_config(path: str | os.PathLike):
  """The run config (ConfigDict) stored in the bundle at `path`."""
  from sedd_jax import config as config_lib  # noqa: PLC0415
  return config_lib.from_dict(read_meta(path)["config"])


def check_out(out: str | os.PathLike, overwrite: bool) -> None:
  """ValueError unless `out` may be written: absent, an empty folder, or a bundle to replace
  with `overwrite` (never a file or a folder holding anything else)."""
  out = pathlib.Path(out).absolute()
  if not out.exists() and not out.is_symlink():
    return
  if not out.is_dir() or out.is_symlink():
    raise ValueError(f"{out} exists and is not a folder; refusing to overwrite it")
  if not any(out.iterdir()):
    return
  if not is_bundle(out):
    raise ValueError(f"{out} is a folder that is not a sedd_jax bundle; refusing to overwrite "
                     "it (give another --out)")
  extra = sorted(p.name for p in out.iterdir() if p.name not in FILES + (DATA_STATS,))
  if extra:
    raise ValueError(f"{out} is a bundle holding other files too ({', '.join(extra[:5])}); "
                     "refusing to overwrite it")
  if not overwrite:
    raise ValueError(f"{out} is a bundle already; pass overwrite (--overwrite) to replace it")


def write(out: str | os.PathLike, model, cfg, *, source: Mapping[str, Any],
          stats: DataStats | None = None, evals: Sequence[tuple[str, dict]] = (),
          overwrite: bool = False) -> pathlib.Path:
  """Writes the bundle of `model` (its current parameters) and `cfg` to the folder `out`.

  Args:
    out: the bundle folder (absent, empty, or a bundle to replace with `overwrite`).
    model: the model whose `nnx.Param`s are saved (`flat_params`).
    cfg: its config (ConfigDict), stored whole.
    source: what it was exported from: {"run", "checkpoint", "step", "weights"} (JSON-able).
    stats: the training data's `DataStats` (None: no data_stats.json).
    evals: (file name, contents) of the run's eval_*.json files, for the model card.
    overwrite: replace an existing bundle.

  Returns:
    the bundle folder (absolute).
  """
  from safetensors import numpy as st_numpy  # noqa: PLC0415
  from sedd_jax import config as config_lib  # noqa: PLC0415

  out = pathlib.Path(out).absolute()
  check_out(out, overwrite)
  meta = {"bundle_format": FORMAT, "sedd_jax_version": version(),
          "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "source": dict(source), "vocabulary": _vocabularies(cfg),
          "config": json.loads(config_lib.to_json(cfg))}
  tensors = flat_params(model)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
  try:
    (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
    st_numpy.save_file(tensors, str(tmp / WEIGHTS),
                       metadata={"format": "sedd_jax", "bundle_format": str(FORMAT)})
    if stats is not None:
      (tmp / DATA_STATS).write_text(json.dumps(stats.to_json(), indent=2))
    (tmp / README).write_text(model_card(meta, stats, evals, tensors))
    os.chmod(tmp, 0o755)
    if out.exists():  # an empty folder or a bundle to replace (`check_out`)
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
      out.rename(old)  # onto the new empty folder
      try:
        tmp.rename(out)
      except BaseException:
        old.rename(out)  # the previous bundle back in place
        raise
      shutil.rmtree(old)
    else:
      tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logger.info("wrote the bundle %s (%d tensors, %s weights of step %s)", out, len(tensors),
              source.get("weights"), source.get("step"))
  return out


def load(path: str | os.PathLike):
  """(model in eval mode, cfg, graph, noise, meta) of the bundle at `path`; ValueError naming
  the tensor whose name, shape or dtype does not fit the model the config builds."""
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from safetensors import SafetensorError  # noqa: PLC0415
  from safetensors import numpy as st_numpy  # noqa: PLC0415

  from sedd_jax import config as config_lib  # noqa: PLC0415
  from sedd_jax import diffusion  # noqa: PLC0415
  from sedd_jax.training.task import get_task  # noqa: PLC0415

  path = pathlib.Path(path).absolute()
  meta = read_meta(path)
  cfg = config_lib.from_dict(meta["config"])
  f = path / WEIGHTS
  if not f.is_file():
    raise FileNotFoundError(f"{f} does not exist")
  try:
    tensors = st_numpy.load_file(str(f))
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{f} cannot be read as safetensors: {e}") from None
  graph = diffusion.get_graph(cfg.graph)
  noise = diffusion.get_noise(cfg.noise)
  model = get_task(cfg).build_model()
  _, params, _ = nnx.split(model, nnx.Param, ...)
  flat = nnx.to_flat_state(params)
  names = [".".join(str(k) for k in p) for p, _ in flat]
  missing = [n for n in names if n not in tensors]
  unknown = sorted(set(tensors) - set(names))
  if missing or unknown:
    raise ValueError(f"{f} does not fit the model of its config: "
                     + "; ".join(filter(None, [
                         missing and f"missing tensor {missing[0]!r} ({len(missing)} in all)",
                         unknown and f"unknown tensor {unknown[0]!r} ({len(unknown)} in all)"])))
  one = jax.local_devices()[0]  # where a checkpoint's weights are placed too (`checkpoint`)
  for name, (_, var) in zip(names, flat):
    want, got = var.get_value(), tensors[name]
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
      raise ValueError(f"{f}: tensor {name!r} is {got.dtype} {tuple(got.shape)}; the model of "
                       f"its config needs {want.dtype} {tuple(want.shape)}")
    var.set_value(jax.device_put(got, one))
  nnx.update(model, params)
  model.eval()
  logger.info("loaded the bundle %s (%s weights of step %s)", path, meta["source"].get("weights"),
              meta["source"].get("step"))
  return model, cfg, graph, noise, meta


# ---- the model card --------------------------------------------------------------------------

_EVAL_KEYS = (("nelbo_per_token", "negative ELBO (nats/token)"),
              ("perplexity", "perplexity"), ("bits_per_residue", "bits/residue"),
              ("unigram_nll_per_token", "unigram baseline (nats/token)"),
              ("loss", "mean loss over the modes (nats/pair)"))


def model_card(meta: Mapping[str, Any], stats: DataStats | None,
               evals: Sequence[tuple[str, dict]] = (),
               tensors: Mapping[str, np.ndarray] | None = None) -> str:
  """The README.md of a bundle: where it comes from, the model, the data, the training and the
  evaluation numbers found in the run (`evals`: (file name, eval JSON) pairs)."""
  cfg, src = meta["config"], meta["source"]
  model, data, train = cfg.get("model", {}), cfg.get("data", {}), cfg.get("training", {})
  graph, noise = cfg.get("graph", {}), cfg.get("noise", {})
  task = cfg.get("task", "sedd")
  n_params = sum(int(np.prod(t.shape)) for t in tensors.values()) if tensors else None
  lines = [
      f"# sedd_jax model: {pathlib.Path(str(src.get('run', 'model'))).name}", "",
      f"Exported by sedd_jax {meta['sedd_jax_version']} on {meta.get('exported', '?')} from "
      f"`{src.get('checkpoint')}` (step {src.get('step')}, {src.get('weights')} weights).",
      "", "```python", "import sedd_jax", "", 'model = sedd_jax.load("<this folder>")',
      *(["seqs = model.sample(8, length=100, seed=0)", "scores = model.score(seqs)"]
        if task != "protein_ligand" else
        ['ligands = model.sample_ligands(["MKTAYIAKQR"], seed=0)']),
      "```", "", "## Model", "",
      f"- task: {task}; graph {graph.get('type')} over {graph.get('tokens')} tokens; noise "
      f"{noise.get('type')} (" + ", ".join(f"{k} {v}" for k, v in noise.items() if k != "type")
      + ")",
      f"- DDiT: hidden {model.get('hidden_size')}, {model.get('n_blocks')} blocks, "
      f"{model.get('n_heads')} heads, cond_dim {model.get('cond_dim')}, length "
      f"{model.get('length')}" + (f", {n_params:,} parameters" if n_params else ""),
      f"- vocabulary: {', '.join(f'{k} {len(v)} tokens' for k, v in meta['vocabulary'].items())}",
      "", "## Training data", "",
      f"- source: `{data.get('fasta') or data.get('pairs') or '?'}`, prepared at "
      f"`{data.get('prepared')}`",
  ]
  if stats is None:
    lines.append("- no statistics (the prepared data were not there at export): `lengths="
                 "\"from-data\"` and the composition need the run's data")
  else:
    for name, t in stats.tracks.items():
      lines.append(f"- {name}: {t.num_sequences:,} training sequences, {t.num_tokens:,} tokens, "
                   f"lengths {int(t.length_values.min())}..{int(t.length_values.max())} "
                   "(histogram and composition in data_stats.json)")
  lines += ["", "## Training", "",
            f"- checkpoint step {src.get('step')} of {train.get('steps')} planned; batch "
            f"{train.get('batch_size')}, lr {cfg.get('optim', {}).get('lr')}, EMA "
            f"{train.get('ema')}", "", "## Evaluation", ""]
  rows = []
  for name, ev in evals:
    vals = [f"{label} {ev[k]:.4g}" for k, label in _EVAL_KEYS
            if isinstance(ev.get(k), (int, float))]
    if vals:
      rows.append(f"- `{name}` ({ev.get('data', '?')}): " + ", ".join(vals))
  lines += rows or ["- none found in the run folder (python -m sedd_jax.evaluate writes "
                    "eval_<split>.json there)"]
  return "\n".join(lines) + "\n"
