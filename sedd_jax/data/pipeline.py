"""Input pipeline on grain: prepared store -> shuffled, cropped, bucketed or packed batches.

  it = make_iterator(cfg, "train", batch_size=64, seed=0,
                     shard_index=jax.process_index(), shard_count=jax.process_count())
  batch = next(it)   # {"tokens": (B, W) int32, "lengths": (B,) int32}
                     # pad_to="pack": + "segment_ids", "positions" (B, L) int32
  state = it.get_state(); ...; it.set_state(state)   # resumes with the same next batches

Per example (a grain `MapDataset`, random access): the record ids of this shard
(`shard_index::shard_count`, disjoint across processes), shuffled with `seed` (a new permutation
every epoch), repeated (`num_epochs=None`: forever, the default for every split; `num_epochs=1`
for one pass over valid/test), then loaded from the memory-mapped store and, when longer than the
model length L = cfg.model.length, cropped to L at a random start drawn from
(seed, record id, epoch) -- so crops are reproducible and differ between epochs.

Batches: "full" and "bucket" (`sedd_jax.data.batching`) group examples by length into
batches of width W = L or the bucket's boundary, padded with `<pad>`; `lengths` counts the real
tokens, so the loss weight / attention mask is `arange(W) < lengths`. Packing is here:

* "pack": W = L and each row holds several (cropped) sequences one after another (at most
  `MAX_SEGMENTS`), packed by grain's `BestFitPackIterDataset` over `data.pack_bins` rows at a
  time (default `DEFAULT_PACK_BINS`). The batch adds `segment_ids` (B, L) int32 (0 = padding,
  1..S = the sequences of the row, in order) and `positions` (B, L) int32 (each residue's index
  within its own sequence); `lengths` counts a row's real tokens, which form a prefix of the row
  (padding only at the end). Padding on the bundled UniProt data at L = 1024: 1.9% (64% with
  "full", 23% with "bucket"). The crop is the same as above (before packing); the iterator's
  state is grain's (the stream position of the first example of the rows being emitted, the
  next row and a counter: JSON-able; a restored iterator re-packs those rows, bit-identically).
  Not for protein-ligand stores (a ligand belongs to one protein).

Unpaired ligands: with `cfg.data.ligand_corpus` set (protein-ligand stores only), each example
also carries one SMILES of that corpus (`sedd_jax.data.ligand_corpus`), drawn uniformly from
(seed, shard, stream position), so resumed iterators draw the same ones; batches add
`corpus_ligand_tokens` (B, Lg) and `corpus_ligand_lengths` (B,), which the `ligand_only` mode
trains on (`sedd_jax.protein_ligand.modes`).

Paths: `ensure_prepared` resolves `cfg.data.fasta` and `cfg.data.prepared` with
`prepare.resolve_path` (absolute as given; relative against the CWD when the path exists there,
else against the repository root) and prepares the store on first use.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Sequence

import numpy as np

from sedd_jax.data import batching
from sedd_jax.data import fasta as fasta_lib
from sedd_jax.data import ligand_corpus as corpus_lib
from sedd_jax.data import prepare as prepare_lib
from sedd_jax.data import store as store_lib
from sedd_jax.data import store_writer
from sedd_jax.data import tokenizers

log = logging.getLogger(__name__)

PAD_TO = ("full", "bucket", "pack")
PACK_KEYS = ("segment_ids", "positions")  # what pad_to="pack" adds to a batch
MAX_SEGMENTS = 16  # sequences per packed row (= sedd_jax.model.attention.MAX_SEGMENTS)
DEFAULT_PACK_BINS = 1024  # rows packed at a time (more rows, less padding)
resolve_path = prepare_lib.resolve_path
DEFAULT_LIGAND_LENGTH = 128

# (store dir, source path, source size, source mtime_ns) of the sources `ensure_prepared` has
# already checked against their store in this process (skips re-hashing the source).
_VERIFIED_SOURCES: set[tuple[str, str, int, int]] = set()


def _cfg_get(section: Any, key: str, default: Any) -> Any:
  try:
    value = section.get(key, default)
  except AttributeError:
    value = getattr(section, key, default)
  return default if value is None else value


def _check_store(out: pathlib.Path, src: pathlib.Path, fmt: str,
                 opts: store_writer.PrepareOptions) -> None:
  """StoreError unless the store `out` was prepared from `src` (checked once per process and
  source version); a warning when its filters differ from `opts`."""
  manifest = store_lib.Store(out, "train").manifest
  st = src.stat()
  key = (str(out), str(src), st.st_size, st.st_mtime_ns)
  if key not in _VERIFIED_SOURCES:
    other = prepare_lib.source_difference(manifest, src, fmt, trust_path=True)
    if other is not None:
      recorded = manifest.get("source", {}).get("path")
      rebuild = f"python -m sedd_jax.data.prepare --input {src} --output {out} --overwrite"
      if recorded == str(src.resolve()):
        raise store_lib.StoreError(
            f"data.fasta = {src} changed since the store data.prepared = {out} was prepared "
            f"from it ({other}); the store is not used. Rebuild it ({rebuild}) or point "
            "data.prepared to a new folder (prepared on first use)")
      raise store_lib.StoreError(
          f"data.fasta = {src} is not the source of the store data.prepared = {out} ({other}; "
          f"the store was prepared from {recorded}); it is not used. Point data.prepared to a "
          f"new folder (prepared on first use), or rebuild this one: {rebuild}")
    _VERIFIED_SOURCES.add(key)
  wanted = {k: v for k, v in opts.__dict__.items() if k not in ("on_error",)}
  have = manifest.get("filters", {})
  diff = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
  if diff:
    log.warning("store %s was prepared with other settings (store, config): %s; using it "
                "as is (rebuild with python -m sedd_jax.data.prepare --overwrite)", out, diff)


def ensure_prepared(cfg: Any) -> pathlib.Path:
  """Prepares `cfg.data.fasta` into `cfg.data.prepared` unless a complete store of it is there.

  Uses cfg.data.{min_length, max_length, min_standard_fraction, valid_fraction, test_fraction}
  and, when present, cfg.data.{format, on_error, max_ligand_length, protein_column,
  smiles_column}. The source must exist and suit the task (`cfg.task`: a pairs CSV only for
  "protein_ligand"), and an existing store must have been prepared from it (the manifest's
  recorded files: `prepare.source_difference`, hashing only a moved or modified source); a store
  of another source (or of an edited one) is refused, never silently used. An existing store
  whose filters differ from the config is kept, with a warning (delete it or run the prepare CLI
  with --overwrite to rebuild). A missing store is prepared only where `prepare.check_paths`
  allows (never over data.fasta, a file or a user's folder). Safe against several processes
  preparing at once (each writes a temporary directory; the first rename wins).

  Returns:
    The resolved store directory.

  Raises:
    fasta.DataError: `cfg.data.fasta` does not exist, is a pairs file for the protein task, or
      is bad input.
    store.StoreError: the store at `cfg.data.prepared` was prepared from another source, or
      data.prepared cannot take a store (one line naming the key).
  """
  d = cfg.data
  out = prepare_lib.resolve_path(d.prepared)
  src = prepare_lib.resolve_path(d.fasta)
  if not src.exists():
    raise fasta_lib.DataError(f"data.fasta = {src} does not exist (the source of the store "
                              f"data.prepared = {out})", src)
  fmt = str(_cfg_get(d, "format", "auto"))
  fmt = fasta_lib.detect_format(src) if fmt == "auto" else fmt
  if fmt == "csv" and str(_cfg_get(cfg, "task", "sedd")) != "protein_ligand":
    raise fasta_lib.DataError(
        f"data.fasta = {src} is a protein-ligand pairs file (format csv); the protein task "
        "trains on a FASTA file or the peers' layout: point data.fasta to one, or train the "
        "protein-ligand model on pairs with --config=configs/protein_ligand.py", src)
  opts = store_writer.PrepareOptions(
      min_length=int(d.min_length), max_length=int(d.max_length),
      min_standard_fraction=float(d.min_standard_fraction),
      valid_fraction=float(d.valid_fraction), test_fraction=float(d.test_fraction),
      on_error=str(_cfg_get(d, "on_error", "raise")),
      max_ligand_length=int(_cfg_get(d, "max_ligand_length", DEFAULT_LIGAND_LENGTH)),
      protein_column=_cfg_get(d, "protein_column", None),
      smiles_column=_cfg_get(d, "smiles_column", None))
  if store_lib.is_prepared(out):
    _check_store(out, src, fmt, opts)
    return out
  prepare_lib.check_paths(src, out, names=("data.fasta =", "data.prepared ="))
  log.info("preparing %s into %s (first use)", src, out)
  try:
    prepare_lib.prepare(src, out, fmt=fmt, options=opts)
  except FileExistsError as e:
    if not store_lib.is_prepared(out):
      raise store_lib.StoreError(f"data.prepared: {e}") from None
  return out


class Examples:
  """Random-access examples: position in the (sharded, shuffled, repeated) stream -> example."""

  def __init__(self, store: store_lib.Store, seed: int, shard_index: int, shard_count: int,
               shuffle: bool, num_epochs: int | None, length: int,
               corpus: corpus_lib.LigandCorpus | None = None):
    import grain  # pylint: disable=g-import-not-at-top

    self.store = store
    self.length = length
    self.ligand = "ligand" in store.tracks
    self.corpus = corpus
    self.seed = int(seed)
    self.shard_index = int(shard_index)
    ids = grain.MapDataset.range(len(store))[shard_index::shard_count]
    self.shard_size = len(ids)
    if self.shard_size == 0:
      raise ValueError(f"shard {shard_index} of {shard_count} of {store.root}/{store.split} is "
                       f"empty ({len(store)} sequences)")
    if shuffle:
      ids = ids.shuffle(seed=self.seed)
    self.ids = ids.repeat(num_epochs)
    self.size = len(self.ids) if num_epochs is not None else None
    self._lengths = np.minimum(store.lengths, length)
    self._cache: dict[int, int] = {}  # position -> record id (grain's lookup is the slow part)

  def record(self, position: int) -> int:
    rec = self._cache.get(position)
    if rec is None:
      rec = self._cache[position] = int(self.ids[position])
      if len(self._cache) > 1 << 16:
        self._cache.clear()
    return rec

  def length_of(self, position: int) -> int:
    return int(self._lengths[self.record(position)])

  def __getitem__(self, position: int) -> dict[str, np.ndarray]:
    rec = self.record(position)
    self._cache.pop(position, None)
    return self.example(position, rec)

  def example(self, position: int, rec: int) -> dict[str, np.ndarray]:
    """Record `rec` at stream `position`, cropped to L (the crop depends on the epoch)."""
    rec = int(rec)
    seq = self.store[rec]
    if seq.size > self.length:
      epoch = position // self.shard_size
      rng = np.random.default_rng((self.seed, rec, epoch))
      start = int(rng.integers(0, seq.size - self.length + 1))
      seq = seq[start:start + self.length]
    out = {"tokens": seq}
    if self.ligand:
      out["ligand_tokens"] = self.store.get(rec, "ligand")
    if self.corpus is not None:
      out["corpus_ligand_tokens"] = self.corpus[self.corpus.draw(self.seed, self.shard_index,
                                                                 position)]
    return out


def _pack_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """grain's packed batch -> {"tokens", "lengths", "segment_ids", "positions"}."""
  seg = batch["tokens_segment_ids"].astype(np.int32)
  return {"tokens": batch["tokens"].astype(np.int32),
          "lengths": (seg > 0).sum(axis=1).astype(np.int32), "segment_ids": seg,
          "positions": batch["tokens_positions"].astype(np.int32)}


def _packed_dataset(examples: Examples, batch_size: int, bins: int, drop_remainder: bool):
  """grain IterDataset of packed batches of `examples` (see the module docstring)."""
  import grain  # pylint: disable=g-import-not-at-top

  ds = examples.ids.map_with_index(lambda pos, rec: {"tokens": examples.example(pos, rec)[
      "tokens"].astype(np.int32)})
  # Read in this thread: the packer is the iterator's only state (and grain's read threads
  # cost more than the mmap reads they would overlap).
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  ds = grain.experimental.BestFitPackIterDataset(
      ds, length_struct={"tokens": examples.length}, num_packing_bins=bins,
      seed=examples.seed, shuffle_bins=True, padding_struct={"tokens": tokenizers.PAD_ID},
      max_sequences_per_bin=MAX_SEGMENTS)
  return ds.batch(batch_size, drop_remainder=drop_remainder).map(_pack_rows)


def pack_sequences(seqs: Sequence[np.ndarray], width: int,
                   bins: int = DEFAULT_PACK_BINS) -> dict[str, np.ndarray]:
  """Packs a finite list of sequences (each at most `width` long) into rows, as pad_to="pack".

  Returns:
    {"tokens", "segment_ids", "positions": (R, width) int32, "lengths": (R,) int32,
     "index": (R, MAX_SEGMENTS) int64: the position in `seqs` of segment s of row r in column
     s - 1, -1 where the row holds fewer sequences}; every sequence is in exactly one row.
  """
  import grain  # pylint: disable=g-import-not-at-top

  items = []
  for i, x in enumerate(seqs):
    x = np.asarray(x, np.int32)
    if x.ndim != 1 or not 0 < x.size <= width:
      raise ValueError(f"sequence {i} has shape {x.shape}; need 1 to {width} tokens")
    items.append({"tokens": x, "index": i})
  ds = grain.MapDataset.source(items).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  ds = grain.experimental.BestFitPackIterDataset(
      ds, length_struct={"tokens": width}, num_packing_bins=bins, shuffle_bins=False,
      padding_struct={"tokens": tokenizers.PAD_ID}, meta_features=("index",),
      max_sequences_per_bin=MAX_SEGMENTS)
  rows = list(ds)
  out = _pack_rows({k: np.stack([r[k] for r in rows])
                    for k in ("tokens", "tokens_segment_ids", "tokens_positions")})
  out["index"] = np.full((len(rows), MAX_SEGMENTS), -1, np.int64)
  for r, row in enumerate(rows):
    out["index"][r, :len(row["index"])] = row["index"]
  return out


def _ligand_corpus(cfg: Any, store: store_lib.Store,
                   ligand_length: int) -> corpus_lib.LigandCorpus | None:
  """The unpaired ligands of `cfg.data.ligand_corpus` ('' or absent: None), tokenized with the
  store's SMILES vocabulary; a ValueError naming the key for a store without ligands."""
  path = str(_cfg_get(cfg.data, "ligand_corpus", "") or "")
  if not path:
    return None
  if "ligand" not in store.tracks:
    raise ValueError(f"{corpus_lib.KEY} = {path!r} needs a protein-ligand store; {store.root} "
                     f"has no ligand track (set it to '')")
  return corpus_lib.load(resolve_path(path), store.smiles_tokenizer(), ligand_length)


def make_dataset(cfg: Any, split: str, batch_size: int, seed: int, shard_index: int = 0,
                 shard_count: int = 1, *, num_epochs: int | None = None,
                 shuffle: bool | None = None, pad_to: str | None = None,
                 drop_remainder: bool = False, store: store_lib.Store | None = None):
  """The grain IterDataset behind `make_iterator` (same arguments)."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  pad_to = pad_to or str(_cfg_get(cfg.data, "pad_to", "full"))
  if pad_to not in PAD_TO:
    raise ValueError(f"data.pad_to must be one of {PAD_TO}, got {pad_to!r}")
  length = int(cfg.model.length)
  if store is None:
    store = store_lib.Store(ensure_prepared(cfg), split)
  if len(store) == 0:
    raise store_lib.StoreError(f"{store.root}/{split} holds no sequences")
  ligand_length = int(_cfg_get(cfg.data, "ligand_length", DEFAULT_LIGAND_LENGTH))
  if "ligand" in store.tracks:
    longest = int(store.track("ligand").lengths.max())
    if longest > ligand_length:
      raise ValueError(f"{store.root}/{split} holds ligands of {longest} tokens, more than "
                       f"data.ligand_length = {ligand_length}; prepare with "
                       f"--max-ligand-length {ligand_length}")
  if pad_to == "pack" and "ligand" in store.tracks:
    raise ValueError(f"data.pad_to='pack' does not apply to the protein-ligand store "
                     f"{store.root} (one ligand per protein); use 'full' or 'bucket'")
  examples = Examples(store, seed, shard_index, shard_count,
                       shuffle=(split == "train") if shuffle is None else shuffle,
                       num_epochs=num_epochs, length=length,
                       corpus=_ligand_corpus(cfg, store, ligand_length))
  if pad_to == "pack":
    bins = int(_cfg_get(cfg.data, "pack_bins", DEFAULT_PACK_BINS))
    if bins < 1:
      raise ValueError(f"data.pack_bins must be >= 1, got {bins}")
    log.info("data %s/%s: %d sequences (shard %d/%d), batch %d, L %d, pad_to pack (%d bins, "
             "at most %d sequences a row)", store.root, split, examples.shard_size, shard_index,
             shard_count, batch_size, length, bins, MAX_SEGMENTS)
    return _packed_dataset(examples, batch_size, bins, drop_remainder)
  bounds = batching.bucket_boundaries(_cfg_get(cfg.data, "bucket_boundaries", ()) or (), length,
                                      pad_to)
  lengths = store.lengths[shard_index::shard_count]
  full = batching.padding_fraction(lengths, length)
  mine = batching.padding_fraction(lengths, length, bounds if pad_to == "bucket" else None)
  log.info("data %s/%s: %d sequences (shard %d/%d), batch %d, L %d, pad_to %s, buckets %s; "
           "padding fraction %.3f (fixed width L: %.3f, buckets of width %s: %.3f)",
           store.root, split, examples.shard_size, shard_index, shard_count, batch_size, length,
           pad_to, list(bounds), mine, full, list(batching.default_boundaries(length)),
           batching.padding_fraction(lengths, length, batching.default_boundaries(length)))
  if "ligand" in store.tracks:
    log.info("data %s/%s: ligand padding fraction %.3f (width %d)", store.root, split,
             batching.padding_fraction(store.track("ligand").lengths[shard_index::shard_count],
                                       ligand_length), ligand_length)
  return batching.bucket_dataset(examples, batch_size, bounds, pad_to=pad_to,
                                drop_remainder=drop_remainder, ligand_length=ligand_length)


def make_iterator(cfg: Any, split: str, batch_size: int, seed: int, shard_index: int = 0,
                  shard_count: int = 1, *, num_epochs: int | None = None,
                  shuffle: bool | None = None, pad_to: str | None = None,
                  drop_remainder: bool = False, store: store_lib.Store | None = None):
  """A checkpointable iterator of batches of split `split` (see the module docstring).

  Args:
    cfg: the config (reads cfg.model.length and cfg.data.*; cfg.data.pad_to,
      cfg.data.pack_bins and cfg.data.ligand_length are optional, defaults "full",
      DEFAULT_PACK_BINS and 128).
    split: train | valid | test.
    batch_size: sequences per batch of THIS shard (the per-process batch).
    seed: shuffle and crop seed.
    shard_index, shard_count: this process's shard (e.g. jax.process_index(),
      jax.process_count()); shards are disjoint.
    num_epochs: None = forever (default for every split); 1 = one pass.
    shuffle: default True for train, False otherwise.
    pad_to: "full" | "bucket" | "pack", overriding cfg.data.pad_to.
    drop_remainder: with a finite num_epochs, drop the last batch if it is partial.
    store: an already open store (skips `ensure_prepared`).

  Returns:
    A grain DatasetIterator with get_state()/set_state() (and padding_fraction() unless
    pad_to="pack"), yielding {"tokens": (B, W) int32, "lengths": (B,) int32} (+ "ligand_tokens":
    (B, Lg) int32, "ligand_lengths": (B,) int32 for protein-ligand stores, and
    "corpus_ligand_tokens", "corpus_ligand_lengths" alike with cfg.data.ligand_corpus;
    + "segment_ids", "positions": (B, L) int32 with pad_to="pack"); W = L unless
    pad_to="bucket".
  """
  ds = make_dataset(cfg, split, batch_size, seed, shard_index, shard_count,
                    num_epochs=num_epochs, shuffle=shuffle, pad_to=pad_to,
                    drop_remainder=drop_remainder, store=store)
  return iter(ds)
