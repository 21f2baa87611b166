"""Sample-quality report for generated protein sequences (pure numpy; JSON + PNG).

Every metric takes sequences as Python strings of one-letter residue codes (the ESM-2 residue
letters; pad/special tokens must already be stripped). The report compares samples with a
reference set (usually training or validation sequences):

* composition: residue frequencies of samples and data, and KL(samples || data) in nats with
  add-`alpha` smoothing over the union alphabet;
* lengths: mean / std / min / max / histogram of both sets;
* low complexity: fraction of sequences holding a homopolymer run >= `run_length` (default 5),
  fraction of residues inside such runs, and the Shannon entropy (bits) of sliding windows of
  `window` residues (default 12, as SEG), with the fraction of windows below `entropy_threshold`
  (default 2.2 bits, SEG's trigger complexity K2);
* diversity: distinct k-mer ratio per k, mean pairwise ungapped identity and mean pairwise
  aligned identity over random subsamples (`sampling.similarity`);
* novelty: for each sample the max k-mer Jaccard to the reference (default k = 3) and the
  highest aligned identity among its `candidates` (default 20) best Jaccard matches
  (`similarity.nearest_jaccard_and_identity`): mean / median, and the fractions of samples
  over 0.5 Jaccard (near copies) and over 0.5 and 0.9 identity; without reference sequences
  (only the training data's composition, `data_composition=`, e.g. an exported bundle's)
  "novelty" is null and "missing" names the input that was not there;
* low-complexity samples: a residue is low-complexity if a window of `window` residues holding
  it has entropy < `entropy_threshold` bits (SEG-like) or it lies in a tandem repeat (a
  period of 1..6 residues repeated at least 3 times in a row, e.g. EKEKEK); a sequence is a
  low-complexity sample if at least `lc_fraction` (default 0.3) of its residues are.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from sedd_jax.sampling import similarity

logger = logging.getLogger(__name__)

def composition(seqs: Iterable[str], alphabet: str | None = None) -> dict[str, float]:
  """Residue frequencies pooled over `seqs` (sum to 1); letters of `alphabet` get 0 if unseen.

  Returns an empty dict for no residues.
  """
  counts = collections.Counter()
  for s in seqs:
    counts.update(s)
  return composition_from_counts(counts, alphabet)


def composition_from_counts(counts: Mapping[str, int], alphabet: str | None = None
                            ) -> dict[str, float]:
  """`composition` from residue counts {letter: count} (an exported bundle's token counts):
  the letters counted at least once, and those of `alphabet`, in sorted order."""
  counts = {a: int(n) for a, n in counts.items() if n > 0}
  if alphabet:
    for a in alphabet:
      counts.setdefault(a, 0)
  total = sum(counts.values())
  if total == 0:
    return {a: 0.0 for a in sorted(counts)}
  return {a: counts[a] / total for a in sorted(counts)}


def kl_divergence(p: dict[str, float], q: dict[str, float], alpha: float = 1e-6) -> float:
  """KL(p || q) in nats over the union of keys, each distribution smoothed by `alpha` and
  renormalised (so an unseen letter never gives infinity)."""
  keys = sorted(set(p) | set(q))
  pv = np.array([p.get(k, 0.0) for k in keys], dtype=np.float64) + alpha
  qv = np.array([q.get(k, 0.0) for k in keys], dtype=np.float64) + alpha
  pv /= pv.sum()
  qv /= qv.sum()
  return float(np.sum(pv * (np.log(pv) - np.log(qv))))


def length_stats(seqs: Sequence[str], bins: int = 20) -> dict:
  """Mean, std, min, max and a histogram (`bins` equal bins) of the sequence lengths."""
  lens = np.array([len(s) for s in seqs], dtype=np.float64)
  if lens.size == 0:
    return {"count": 0}
  hist, edges = np.histogram(lens, bins=bins)
  return {"count": int(lens.size), "mean": float(lens.mean()), "std": float(lens.std()),
          "min": int(lens.min()), "max": int(lens.max()),
          "hist": hist.tolist(), "bin_edges": edges.tolist()}


def homopolymer_runs(seq: str, run_length: int = 5) -> list[tuple[int, int]]:
  """(start, length) of every maximal run of one residue with length >= run_length."""
  runs = []
  start = 0
  for i in range(1, len(seq) + 1):
    if i == len(seq) or seq[i] != seq[start]:
      if i - start >= run_length:
        runs.append((start, i - start))
      start = i
  return runs


def window_entropies(seq: str, window: int = 12) -> np.ndarray:
  """Shannon entropy (bits) of every sliding window of `window` residues: (len - window + 1,).

  A sequence shorter than the window gives one value, the entropy of the whole sequence
  (empty array for an empty sequence).
  """
  if not seq:
    return np.zeros((0,))
  w = min(window, len(seq))
  codes = np.frombuffer(seq.encode("latin-1"), np.uint8)
  onehot = codes[:, None] == np.unique(codes)[None, :]  # (len, letters)
  cum = np.concatenate([np.zeros((1, onehot.shape[1]), np.int64), np.cumsum(onehot, axis=0)])
  p = (cum[w:] - cum[:-w]) / w  # (len - w + 1, letters) window frequencies
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, p * np.log2(p), 0.0)
  return 0.0 - terms.sum(axis=1)


def tandem_repeat_mask(seq: str, max_period: int = 6, min_copies: int = 3) -> np.ndarray:
  """(len,) bool: residues inside a tandem repeat, a block of period p <= `max_period`
  repeated >= `min_copies` times in a row (seq[i] == seq[i + p] for (min_copies - 1) p
  consecutive i)."""
  codes = np.frombuffer(seq.encode("latin-1"), np.uint8)
  out = np.zeros(len(codes), bool)
  for p in range(1, max_period + 1):
    need = (min_copies - 1) * p
    if len(codes) < need + p:
      break
    same = np.concatenate([[0], np.cumsum(codes[:-p] == codes[p:])])  # prefix counts
    start = (same[need:] - same[:-need]) == need  # seq[j] == seq[j + p] for j in i..i+need-1
    out |= np.convolve(start, np.ones(need + p, bool))[:len(codes)] > 0  # spans need + p
  return out


def low_complexity_mask(seq: str, window: int = 12, entropy_threshold: float = 2.2,
                        max_period: int = 6, min_copies: int = 3) -> np.ndarray:
  """(len,) bool: residues in a window of entropy < `entropy_threshold` bits or in a tandem
  repeat (see the module docstring)."""
  if not seq:
    return np.zeros((0,), bool)
  low = window_entropies(seq, window) < entropy_threshold  # windows starting at 0..len - w
  w = min(window, len(seq))
  cover = np.convolve(low.astype(np.int64), np.ones(w, np.int64))[:len(seq)] > 0
  return cover | tandem_repeat_mask(seq, max_period, min_copies)


def low_complexity(seqs: Sequence[str], run_length: int = 5, window: int = 12,
                   entropy_threshold: float = 2.2, lc_fraction: float = 0.3) -> dict:
  """Homopolymer-run, window-entropy and low-complexity-sample statistics of `seqs` (see the
  module docstring)."""
  n_with_run = 0
  run_residues = 0
  total = 0
  ents = []
  lc_residues = 0
  n_lc = 0
  for s in seqs:
    lc = low_complexity_mask(s, window, entropy_threshold)
    lc_residues += int(lc.sum())
    n_lc += bool(lc.size) and lc.mean() >= lc_fraction
    runs = homopolymer_runs(s, run_length)
    n_with_run += bool(runs)
    run_residues += sum(r for _, r in runs)
    total += len(s)
    ents.append(window_entropies(s, window))
  ents = np.concatenate(ents) if ents else np.zeros((0,))
  return {
      "run_length": run_length,
      "frac_seqs_with_homopolymer": n_with_run / max(len(seqs), 1),
      "frac_residues_in_homopolymer": run_residues / max(total, 1),
      "window": window,
      "entropy_threshold_bits": entropy_threshold,
      "mean_window_entropy_bits": float(ents.mean()) if ents.size else float("nan"),
      "frac_low_entropy_windows": float((ents < entropy_threshold).mean()) if ents.size else 0.0,
      "lc_fraction": lc_fraction,
      "frac_residues_low_complexity": lc_residues / max(total, 1),
      "frac_low_complexity_seqs": n_lc / max(len(seqs), 1),
  }


def quality_report(samples: Sequence[str], data: Sequence[str], *, ks: Sequence[int] = (1, 2, 3),
                   novelty_k: int = 3, max_reference: int = 5000, max_identity_seqs: int = 200,
                   run_length: int = 5, window: int = 12, entropy_threshold: float = 2.2,
                   seed: int = 0, alignment_candidates: int = 20,
                   max_aligned_identity_seqs: int = 100, lc_fraction: float = 0.3,
                   data_composition: Mapping[str, float] | None = None,
                   missing: str | None = None) -> dict:
  """The full report (a JSON-serialisable dict) of `samples` against the reference `data`.

  `data` is subsampled to `max_reference` sequences for novelty (seeded by `seed`). Without
  reference sequences (`data` empty) the composition is `data_composition` (the training
  data's, e.g. from a bundle's token counts; else empty), "novelty" is None and "missing"
  says why (`missing`: the input that was not there).
  """
  samples = list(samples)
  data = list(data)
  if data and data_composition is not None:
    raise ValueError("give data sequences or data_composition, not both")
  rng = np.random.default_rng(seed)
  ref = data
  if len(ref) > max_reference:
    ref = [data[i] for i in sorted(rng.choice(len(data), max_reference, replace=False))]
  comp_s = composition(samples)
  comp_d = composition(data) if data_composition is None else dict(data_composition)
  report = {
      "num_samples": len(samples),
      "num_reference": len(data),
      "composition": {"samples": comp_s, "data": comp_d,
                      "kl_samples_data_nats": kl_divergence(comp_s, comp_d)},
      "lengths": {"samples": length_stats(samples), "data": length_stats(data)},
      "low_complexity": {
          "samples": low_complexity(samples, run_length, window, entropy_threshold, lc_fraction),
          "data": low_complexity(data, run_length, window, entropy_threshold, lc_fraction)},
      "diversity": {
          "distinct_kmer_ratio": {str(k): similarity.distinct_kmer_ratio(samples, k)
                                  for k in ks},
          "mean_pairwise_identity": similarity.mean_pairwise_identity(samples, max_identity_seqs,
                                                                   seed),
          "identity": "ungapped positional",
          "mean_pairwise_aligned_identity": similarity.mean_pairwise_aligned_identity(
              samples, max_aligned_identity_seqs, seed),
          "aligned_identity": similarity.ALIGNED_IDENTITY},
      "novelty": None,
  }
  if not data:
    report["missing"] = ("novelty needs the reference sequences: "
                         + (missing or "no data sequences given"))
    return report
  near, ident = similarity.nearest_jaccard_and_identity(samples, ref, novelty_k,
                                                         alignment_candidates, chunk=1024)
  report["novelty"] = {
      "k": novelty_k,
      "num_reference_used": len(ref),
      "nearest_jaccard_mean": float(near.mean()) if near.size else float("nan"),
      "nearest_jaccard_median": float(np.median(near)) if near.size else float("nan"),
      "frac_nearest_jaccard_over_0.5": float((near > 0.5).mean()) if near.size else 0.0,
      "nearest_jaccard": near.tolist(),
      "alignment_candidates": alignment_candidates,
      "aligned_identity": similarity.ALIGNED_IDENTITY,
      "nearest_identity_mean": float(ident.mean()) if ident.size else float("nan"),
      "nearest_identity_median": float(np.median(ident)) if ident.size else float("nan"),
      "frac_nearest_identity_over_0.5": float((ident > 0.5).mean()) if ident.size else 0.0,
      "frac_nearest_identity_over_0.9": float((ident > 0.9).mean()) if ident.size else 0.0,
      "nearest_identity": ident.tolist()}
  return report


def _clean(obj):
  """NaN/inf -> None, recursively, so the JSON is strict."""
  if isinstance(obj, dict):
    return {k: _clean(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_clean(v) for v in obj]
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write_json(report: dict, path: str | os.PathLike) -> None:
  """Writes `report` as indented strict JSON (NaN -> null)."""
  with open(path, "w") as f:
    json.dump(_clean(report), f, indent=2)
  logger.info("wrote report %s", path)


def plot_lengths(ax, samples: Sequence[str], data: Sequence[str], bins: int = 30,
                 max_marked: int = 3, max_length: int | None = None) -> None:
  """The length panel: the fraction of sequences per length bin, over bins shared by both sets.

  Samples of at most `max_marked` distinct lengths (the usual case: one length for all) are
  drawn as a vertical marker per length instead of a bar, which would be one bin wide next to
  the data's histogram. `max_length`: the model's length, drawn as a dashed line, with the
  share of data sequences longer than it (lengths drawn from the data are capped there).
  """
  len_s = np.array([len(s) for s in samples])
  len_d = np.array([len(s) for s in data])
  edges = np.histogram_bin_edges(np.concatenate([len_s, len_d]).astype(np.float64), bins=bins)
  if len_d.size:
    ax.hist(len_d, bins=edges, weights=np.full(len_d.size, 1 / len_d.size), alpha=0.5,
            label="data")
  distinct, counts = np.unique(len_s, return_counts=True)
  if 0 < distinct.size <= max_marked:
    for n, c in zip(distinct, counts):
      ax.axvline(n, color="C1", linewidth=2,
                 label=f"samples: length {n} ({c} of {len_s.size})")
  elif len_s.size:
    ax.hist(len_s, bins=edges, weights=np.full(len_s.size, 1 / len_s.size), alpha=0.5,
            label="samples")
  title = "length (fraction of sequences per bin)"
  if max_length is not None:
    over = float(np.mean(len_d > max_length)) if len_d.size else 0.0
    ax.axvline(max_length, color="k", linestyle="--", linewidth=1,
               label=f"model length {max_length} ({over:.1%} of data longer)")
    title += f"; samples capped at {max_length}"
  ax.set_title(title)
  ax.legend()


def plot_report(report: dict, samples: Sequence[str], data: Sequence[str],
                path: str | os.PathLike, window: int = 12, max_length: int | None = None) -> None:
  """Four panels to PNG: composition, length histograms (`max_length`: the model's length,
  `plot_lengths`), window entropy, nearest Jaccard."""
  from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

  fig = Figure(figsize=(12, 8))
  axes = fig.subplots(2, 2)
  comp_s, comp_d = report["composition"]["samples"], report["composition"]["data"]
  letters = sorted(set(comp_s) | set(comp_d), key=lambda a: -comp_d.get(a, 0.0))
  xs = np.arange(len(letters))
  ax = axes[0, 0]
  ax.bar(xs - 0.2, [comp_d.get(a, 0) for a in letters], 0.4, label="data")
  ax.bar(xs + 0.2, [comp_s.get(a, 0) for a in letters], 0.4, label="samples")
  ax.set_xticks(xs, letters)
  ax.set_title(f"composition (KL {report['composition']['kl_samples_data_nats']:.4f} nats)")
  ax.legend()
  plot_lengths(axes[0, 1], samples, data, max_length=max_length)
  ax = axes[1, 0]
  ent_d = np.concatenate([window_entropies(s, window) for s in data] or [np.zeros(0)])
  ent_s = np.concatenate([window_entropies(s, window) for s in samples] or [np.zeros(0)])
  if ent_d.size:  # none without data sequences
    ax.hist(ent_d, bins=30, alpha=0.5, density=True, label="data")
  ax.hist(ent_s, bins=30, alpha=0.5, density=True, label="samples")
  ax.set_title(f"window entropy (bits, window {window})")
  ax.legend()
  ax = axes[1, 1]
  ax.set_title("nearest reference")
  if report["novelty"] is None:
    ax.text(0.5, 0.5, report["missing"], ha="center", va="center", wrap=True,
            transform=ax.transAxes)
  else:
    ax.hist(report["novelty"]["nearest_jaccard"], bins=30, range=(0, 1), alpha=0.5,
            label=f"{report['novelty']['k']}-mer Jaccard")
    ax.hist(report["novelty"]["nearest_identity"], bins=30, range=(0, 1), alpha=0.5,
            label="aligned identity")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  logger.info("wrote plot %s", path)


def write_report(samples: Sequence[str], data: Sequence[str], json_path: str | os.PathLike,
                 png_path: str | os.PathLike | None = None, *, max_length: int | None = None,
                 **kwargs) -> dict:
  """Computes `quality_report`, writes it as JSON and (if `png_path`) as a PNG (`max_length`:
  the model's length, marked in the length panel); returns it."""
  report = quality_report(samples, data, **kwargs)
  write_json(report, json_path)
  if png_path is not None:
    plot_report(report, samples, data, png_path, window=kwargs.get("window", 12),
                max_length=max_length)
  return report
