"""Unpaired ligands (`data.ligand_corpus`): a SMILES file that the protein-ligand trainer's
`ligand_only` mode draws from, so that the ligand track learns SMILES from many more molecules
than the pairs hold (the bundled pairs have 458 distinct ligands; the bundled MOSES subset
`data/moses_smiles_every8.csv.gz` has 198,083).

The file is a CSV/TSV (plain or gzip) whose header names a SMILES column (`pairs.SMILES_COLUMNS`,
e.g. `SMILES`), or a `.smi` file without a header: the first whitespace-separated field of each
line. It is tokenized with the protein-ligand store's SMILES vocabulary; a SMILES with a token
outside that vocabulary (the model could never write it) or longer than the ligand width is
skipped and counted (a foreign corpus normally holds some). A file that is missing, empty or
has no usable SMILES raises `DataError` naming it and the config key.

  corpus = load(cfg.data.ligand_corpus, store.smiles_tokenizer(), max_length=128)
  corpus[i]                       # (n_i,) int32 token ids of SMILES i
  corpus.draw(seed, shard, pos)   # the corpus index that stream position `pos` pairs with
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import pathlib
from typing import Iterator

import numpy as np

from sedd_jax.data import pairs
from sedd_jax.data import tokenizers
from sedd_jax.data.fasta import DataError, PathLike, location

log = logging.getLogger(__name__)

KEY = "data.ligand_corpus"
# Separates the corpus draws from the crop draws of the same seed (numpy), and the corpus-or-pair
# draw of `protein_ligand.modes` from the step key (jax.random.fold_in).
CORPUS_SALT = 0x5EDD


def read_smiles(path: PathLike) -> Iterator[tuple[str, int]]:
  """Streams (SMILES, line) from a CSV/TSV with a SMILES column or a header-less `.smi` file."""
  path = pathlib.Path(path)
  lineno = 0
  with pairs.table_errors(path, lambda: lineno), pairs.open_table(
      path, f"{KEY} needs SMILES") as (text, first):
    delimiter = "\t" if "\t" in first else ","
    header = next(csv.reader([first], delimiter=delimiter))
    lower = [h.strip().lower() for h in header]
    column = next((lower.index(c) for c in pairs.SMILES_COLUMNS if c in lower), None)
    if column is None:  # no header: every line holds a SMILES (first field)
      lineno = 1
      yield first.split()[0], 1
      for lineno, line in enumerate(text, start=2):
        if line.strip():
          yield line.split()[0], lineno
      return
    reader = csv.reader(text, delimiter=delimiter)
    for row in reader:
      lineno = reader.line_num + 1
      if len(row) > column and row[column].strip():
        yield row[column].strip(), lineno


@dataclasses.dataclass(frozen=True)
class LigandCorpus:
  """Tokenized SMILES: `tokens (T,) int32` concatenated, `offsets (N + 1,) int64`."""

  path: str
  tokens: np.ndarray
  offsets: np.ndarray
  skipped: dict[str, int]

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]

  def draw(self, seed: int, shard_index: int, position: int) -> int:
    """The corpus index paired with stream `position` of shard `shard_index`: uniform, a pure
    function of its arguments (so a resumed iterator draws the same ligands)."""
    rng = np.random.default_rng((int(seed), CORPUS_SALT, int(shard_index), int(position)))
    return int(rng.integers(len(self)))


def load(path: PathLike, tokenizer: tokenizers.SmilesTokenizer, max_length: int) -> LigandCorpus:
  """Reads and tokenizes the corpus at `path` (cached per file version, vocabulary and width)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{KEY} = {path} does not exist (a SMILES CSV/.smi file, or '' for none)", path)
  st = path.stat()
  return _load(str(path.resolve()), st.st_size, st.st_mtime_ns, tokenizer.vocab, int(max_length))


@functools.lru_cache(maxsize=4)
def _load(path: str, size: int, mtime_ns: int, vocab: tuple[str, ...],
          max_length: int) -> LigandCorpus:
  del size, mtime_ns  # cache keys only
  tokenizer = tokenizers.SmilesTokenizer(vocab[len(tokenizers.SMILES_SPECIALS):-1])
  seqs: list[np.ndarray] = []
  skipped = {"unknown_token": 0, "too_long": 0}
  first_skip = {}
  for smiles, line in read_smiles(path):
    try:
      ids = tokenizer.encode(smiles, source=path, line=line)
    except tokenizers.TokenizeError as e:
      skipped["unknown_token"] += 1
      first_skip.setdefault("unknown_token", str(e))
      continue
    if ids.size > max_length:
      skipped["too_long"] += 1
      first_skip.setdefault("too_long", f"{location(path, line)}: {ids.size} tokens")
      continue
    seqs.append(ids)
  total = len(seqs) + sum(skipped.values())
  if not seqs:
    raise DataError(f"{KEY} = {path}: none of its {total} SMILES is usable (skipped {skipped}; "
                    f"first: {first_skip})", path)
  lengths = np.fromiter((s.size for s in seqs), np.int64, len(seqs))
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  corpus = LigandCorpus(path, np.concatenate(seqs).astype(np.int32), offsets, skipped)
  log.info("%s = %s: %d of %d SMILES used (mean %.1f tokens); skipped %s, e.g. %s", KEY, path,
           len(corpus), total, lengths.mean(), skipped, first_skip or "-")
  return corpus
