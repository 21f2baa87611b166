"""Similarity of protein sequences: k-mer diversity, identity, and novelty against a reference
(pure numpy + parasail), the alignment and novelty half of `sampling.report`.

Sequences are Python strings of one-letter residue codes (pad/special tokens stripped).

* diversity: distinct k-mer ratio (distinct / total k-mers, pooled over all samples) and mean
  pairwise identity over a random subsample. `identity` is UNGAPPED and positional: matches at
  the same index / the shorter length (no alignment; cheap, and meaningful for fixed-length
  diffusion samples, an underestimate of aligned identity otherwise);
* novelty: for each sample the nearest reference sequence by k-mer Jaccard similarity (sets of
  k-mers, default k = 3);
* aligned identity (parasail): semi-global alignment (end gaps free, BLOSUM62, gap open 10 /
  extend 1), identity = identical aligned residues / length of the shorter sequence (CD-HIT's
  definition). Novelty by alignment: for each sample the highest identity to the reference,
  aligning with the `candidates` (default 20) references of highest k-mer Jaccard (a k-mer
  prefilter as MMseqs2's: aligning with all of them costs N x R alignments).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import parasail


def kmers(seq: str, k: int) -> list[str]:
  """All overlapping k-mers of `seq` (empty if shorter than k)."""
  return [seq[i:i + k] for i in range(len(seq) - k + 1)]


def distinct_kmer_ratio(seqs: Iterable[str], k: int) -> float:
  """Number of distinct k-mers / number of k-mers, pooled over all sequences (nan if none)."""
  seen = set()
  total = 0
  for s in seqs:
    km = kmers(s, k)
    seen.update(km)
    total += len(km)
  return len(seen) / total if total else float("nan")


def identity(a: str, b: str) -> float:
  """Ungapped positional identity: matches at the same index / min(len(a), len(b))."""
  n = min(len(a), len(b))
  if n == 0:
    return float("nan")
  return sum(x == y for x, y in zip(a[:n], b[:n])) / n


def mean_pairwise_identity(seqs: Sequence[str], max_seqs: int = 200, seed: int = 0) -> float:
  """Mean `identity` over all pairs of a random subsample of at most `max_seqs` sequences."""
  seqs = list(seqs)
  if len(seqs) > max_seqs:
    idx = np.random.default_rng(seed).choice(len(seqs), max_seqs, replace=False)
    seqs = [seqs[i] for i in sorted(idx)]
  if len(seqs) < 2:
    return float("nan")
  n = max(len(s) for s in seqs)
  codes = np.full((len(seqs), n), -1, dtype=np.int32)
  for r, s in enumerate(seqs):
    codes[r, :len(s)] = np.frombuffer(s.encode("ascii"), dtype=np.uint8)
  lens = np.array([len(s) for s in seqs])
  vals = []
  for i in range(len(seqs) - 1):
    m = np.minimum(lens[i], lens[i + 1:])  # (n - i - 1,)
    cols = np.arange(n)[None, :] < m[:, None]
    same = (codes[i + 1:] == codes[i][None, :]) & cols
    ok = m > 0
    vals.append(same.sum(axis=1)[ok] / m[ok])
  vals = np.concatenate(vals)
  return float(vals.mean()) if vals.size else float("nan")


ALIGN_GAP_OPEN, ALIGN_GAP_EXTEND = 10, 1
ALIGNED_IDENTITY = ("semi-global alignment (parasail, BLOSUM62, gap open 10 / extend 1, end "
                    "gaps free); identical residues / shorter length")


def aligned_identity(a: str, b: str) -> float:
  """Identity of the semi-global alignment of a and b (BLOSUM62, gaps 10/1, end gaps free):
  identical aligned residues / min(len(a), len(b)); nan if either is empty."""
  if not a or not b:
    return float("nan")
  # 16-bit scores saturate at 32767 (BLOSUM62's best is 11 a residue): 32 bits beyond 2900.
  align = parasail.sg_stats_striped_16 if max(len(a), len(b)) < 2900 else (
      parasail.sg_stats_striped_32)
  r = align(a, b, ALIGN_GAP_OPEN, ALIGN_GAP_EXTEND, parasail.blosum62)
  return r.matches / min(len(a), len(b))


def mean_pairwise_aligned_identity(seqs: Sequence[str], max_seqs: int = 100, seed: int = 0
                                   ) -> float:
  """Mean `aligned_identity` over all pairs of a random subsample of <= `max_seqs` sequences."""
  seqs = [s for s in seqs if s]
  if len(seqs) > max_seqs:
    seqs = [seqs[i] for i in sorted(np.random.default_rng(seed).choice(len(seqs), max_seqs,
                                                                       replace=False))]
  vals = [aligned_identity(a, b) for i, a in enumerate(seqs) for b in seqs[i + 1:]]
  return float(np.mean(vals)) if vals else float("nan")


def _kmer_matrix(seqs: Sequence[str], k: int, index: dict[str, int]) -> np.ndarray:
  """(N, V) float32 0/1 presence matrix of the k-mers in `index` (unknown k-mers are added)."""
  rows = []
  for s in seqs:
    ids = set()
    for km in kmers(s, k):
      if km not in index:
        index[km] = len(index)
      ids.add(index[km])
    rows.append(ids)
  mat = np.zeros((len(seqs), len(index)), dtype=np.float32)
  for r, ids in enumerate(rows):
    if ids:
      mat[r, list(ids)] = 1.0
  return mat


def _jaccard_chunks(samples: Sequence[str], reference: Sequence[str], k: int, chunk: int):
  """Yields (lo, (n, R) k-mer-set Jaccard of samples[lo:lo + n] against every reference)."""
  index: dict[str, int] = {}
  ref = _kmer_matrix(reference, k, index)
  smp = _kmer_matrix(samples, k, index)
  ref = np.pad(ref, ((0, 0), (0, len(index) - ref.shape[1])))
  ref_sizes = ref.sum(axis=1)
  smp_sizes = smp.sum(axis=1)
  for lo in range(0, len(samples), chunk):
    inter = smp[lo:lo + chunk] @ ref.T  # (n, R)
    union = smp_sizes[lo:lo + chunk, None] + ref_sizes[None, :] - inter
    yield lo, np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def nearest_jaccard(samples: Sequence[str], reference: Sequence[str], k: int = 3,
                    chunk: int = 1024) -> np.ndarray:
  """For each sample the max k-mer-set Jaccard similarity to any reference sequence: (N,).

  Jaccard(A, B) = |A & B| / |A | B| over the sets of k-mers; 0 when both sets are empty.
  """
  best = np.zeros(len(samples))
  if len(reference) == 0:
    return best
  for lo, jac in _jaccard_chunks(samples, reference, k, chunk):
    best[lo:lo + len(jac)] = jac.max(axis=1)
  return best


def nearest_jaccard_and_identity(samples: Sequence[str], reference: Sequence[str], k: int,
                                  candidates: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
  """(`nearest_jaccard`, `nearest_aligned_identity`) of one pass over the Jaccard chunks."""
  best_jac = np.zeros(len(samples))
  best_id = np.zeros(len(samples))
  if len(reference) == 0:
    return best_jac, best_id
  for lo, jac in _jaccard_chunks(samples, reference, k, chunk):
    best_jac[lo:lo + len(jac)] = jac.max(axis=1)
    top = np.argsort(-jac, axis=1, kind="stable")[:, :candidates]
    for r, row in enumerate(top):
      ids = [aligned_identity(samples[lo + r], reference[j]) for j in row]
      best_id[lo + r] = np.nanmax(ids) if np.isfinite(ids).any() else 0.0
  return best_jac, best_id


def nearest_aligned_identity(samples: Sequence[str], reference: Sequence[str], k: int = 3,
                             candidates: int = 20, chunk: int = 1024) -> np.ndarray:
  """For each sample the highest `aligned_identity` to the `candidates` references of highest
  k-mer Jaccard (all of them if there are fewer): (N,) in [0, 1] (0 with no reference)."""
  return nearest_jaccard_and_identity(samples, reference, k, candidates, chunk)[1]
