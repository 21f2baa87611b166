"""Reading a store written by `sedd_jax.data.prepare` (memory-mapped, nothing loaded up front).

  store = Store.open("data/prepared/uniprot", "train")
  len(store), store[i] -> (len_i,) uint8 ESM-2 ids, store.lengths -> (N,) int32
  store.get(i, "ligand") -> (n_i,) SMILES ids (protein-ligand stores)

* `open_store(root, split)` / `Store`: one split, memory-mapped.
* `is_store(path)`: a folder holding a store's manifest (what must not become a run folder).
* `is_prepared(root)`: a complete store.
* `store_files(manifest)`: the files a store consists of (what `prepare --overwrite` replaces).
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from sedd_jax.data import tokenizers

SPLITS = ("train", "valid", "test")


class StoreError(ValueError):
  """A missing, incomplete or corrupt store, or a path that cannot take one (a user's folder or
  file, a full disk); the message names the path."""


def _load_json(path: pathlib.Path) -> dict:
  if not path.exists():
    raise StoreError(f"{path} is missing: not a prepared store (run python -m "
                     "sedd_jax.data.prepare)")
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StoreError(f"{path} is corrupt: {e}") from None


def _load_npy(path: pathlib.Path) -> np.ndarray:
  if not path.exists():
    raise StoreError(f"{path} is missing: incomplete store")
  try:
    # A plain ndarray view of the memory map (slicing a np.memmap is several times slower).
    arr = np.asarray(np.load(path, mmap_mode="r"))
  except (ValueError, OSError, EOFError) as e:
    raise StoreError(f"{path} is corrupt: {e}") from None
  if arr.ndim != 1:
    raise StoreError(f"{path} is corrupt: expected a 1-D array, got shape {arr.shape}")
  return arr


class Track:
  """One token track of one split: `tokens (T,)` + `offsets (N + 1,)`, memory-mapped."""

  def __init__(self, directory: pathlib.Path, prefix: str = ""):
    self.tokens = _load_npy(directory / f"{prefix}tokens.npy")
    self.offsets = _load_npy(directory / f"{prefix}offsets.npy")
    off = self.offsets
    if (off.dtype != np.int64 or off.size == 0 or off[0] != 0
        or off[-1] != self.tokens.size):
      raise StoreError(f"{directory / (prefix + 'offsets.npy')} is corrupt: offsets do not "
                       f"match {prefix}tokens.npy ({self.tokens.size} tokens)")
    self._lengths = None

  def __len__(self) -> int:
    return self.offsets.size - 1

  def __getitem__(self, i: int) -> np.ndarray:
    """`(len_i,)` ids (a read-only view of the memory map)."""
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"index {i} out of range for {n} sequences")
    i %= n
    return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])]

  @property
  def lengths(self) -> np.ndarray:
    """`(N,)` int32 sequence lengths (computed once)."""
    if self._lengths is None:
      self._lengths = np.diff(np.asarray(self.offsets)).astype(np.int32)
    return self._lengths


class Store:
  """One split of a prepared store.

  Attributes:
    root: the store directory; split: train | valid | test.
    manifest: the store's manifest.json (dict); split_manifest: the split's manifest.json.
    tracks: ("protein",) or ("protein", "ligand").
  """

  def __init__(self, root: str | os.PathLike, split: str = "train"):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    self.root = pathlib.Path(root)
    self.split = split
    if not self.root.is_dir():
      raise StoreError(f"prepared store {self.root} does not exist (run python -m "
                       "sedd_jax.data.prepare --output " f"{self.root})")
    self.manifest = _load_json(self.root / "manifest.json")
    self.split_manifest = _load_json(self.root / split / "manifest.json")
    self.tracks = tuple(self.manifest.get("tracks", ("protein",)))
    self._tracks = {t: Track(self.root / split, "" if t == "protein" else f"{t}_")
                    for t in self.tracks}
    sizes = {t: len(tr) for t, tr in self._tracks.items()}
    if len(set(sizes.values())) != 1:
      raise StoreError(f"{self.root / split} is corrupt: tracks differ in length {sizes}")
    if sizes["protein"] != self.split_manifest.get("sequences", sizes["protein"]):
      raise StoreError(f"{self.root / split} is corrupt: {sizes['protein']} sequences, manifest "
                       f"says {self.split_manifest.get('sequences')}")

  @classmethod
  def open(cls, root: str | os.PathLike, split: str = "train") -> "Store":
    return cls(root, split)

  def __len__(self) -> int:
    return len(self._tracks["protein"])

  def __getitem__(self, i: int) -> np.ndarray:
    """`(len_i,)` uint8 ESM-2 ids of protein `i` (read-only memory-map view)."""
    return self._tracks["protein"][i]

  def get(self, i: int, track: str = "protein") -> np.ndarray:
    return self.track(track)[i]

  def track(self, name: str) -> Track:
    if name not in self._tracks:
      raise KeyError(f"store {self.root} has no track {name!r} (tracks: {self.tracks})")
    return self._tracks[name]

  @property
  def lengths(self) -> np.ndarray:
    """`(N,)` int32 protein lengths."""
    return self._tracks["protein"].lengths

  def smiles_tokenizer(self) -> tokenizers.SmilesTokenizer:
    """The SMILES vocabulary saved beside a protein-ligand store."""
    if "ligand" not in self.tracks:
      raise StoreError(f"store {self.root} has no ligand track")
    return tokenizers.SmilesTokenizer.load(self.root / "smiles_vocab.json")


def open_store(root: str | os.PathLike, split: str = "train") -> Store:
  """Opens split `split` of the store at `root` (StoreError naming the path if bad)."""
  return Store(root, split)


def is_store(path: str | os.PathLike) -> bool:
  """Whether `path` is a folder holding a store's manifest.json (a JSON object with
  `format_version` and `splits`, as `sedd_jax.data.prepare` writes it), complete or not."""
  try:
    with open(pathlib.Path(path) / "manifest.json") as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError):
    return False
  return isinstance(manifest, dict) and {"format_version", "splits"} <= manifest.keys()


def store_files(manifest: dict) -> tuple[str, ...]:
  """The files (paths relative to the store folder) of the store whose manifest is `manifest`:
  manifest.json, the SMILES vocabulary of a protein-ligand store, and per split its
  manifest.json and each track's tokens.npy + offsets.npy (`<track>_` prefixed but protein's)."""
  tracks = manifest.get("tracks", ["protein"])
  files = ["manifest.json"]
  if "ligand" in tracks:
    files.append(manifest.get("vocabulary", {}).get("ligand", {}).get("file",
                                                                       "smiles_vocab.json"))
  for s in SPLITS:
    files.append(f"{s}/manifest.json")
    for t in tracks:
      prefix = "" if t == "protein" else f"{t}_"
      files += [f"{s}/{prefix}tokens.npy", f"{s}/{prefix}offsets.npy"]
  return tuple(files)


def is_prepared(root: str | os.PathLike) -> bool:
  """Whether `root` holds a complete store (manifest and every split's arrays)."""
  root = pathlib.Path(root)
  if not (root / "manifest.json").exists():
    return False
  return all((root / s / f).exists() for s in SPLITS
             for f in ("tokens.npy", "offsets.npy", "manifest.json"))
