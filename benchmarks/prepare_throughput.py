"""Throughput of `python -m sedd_jax.data.prepare` and the pipeline's padding, on the CPU.

  python benchmarks/prepare_throughput.py [--sequences 200000] [--workdir /tmp/sedd_prepare_bench]

1. The bundled UniProt set (data/uniprot_mmseqs2_example.fasta.gz): wall seconds of the CLI.
2. A generated FASTA of `--sequences` random proteins (lengths drawn from the bundled set, 60
   residues per line, 1% exact duplicates, 0.5% with an 'X' run), plain and gzip: residues/s and
   sequences/s of `prepare` (streaming, filters, dedup, hash split, store).
3. Padding fraction of batches from the bundled store for several model lengths: fixed width L
   (pad_to="full"), buckets (pad_to="bucket", default boundaries), and first-fit-decreasing
   packing of several sequences per row (an upper bound on what packing would gain).
Results are logged and written as JSON to <workdir>/results.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sedd_jax.data import batching, prepare, store, tokenizers  # noqa: E402

log = logging.getLogger("prepare_throughput")


def generate(path: pathlib.Path, n: int, lengths: np.ndarray, seed: int = 0) -> int:
  """Writes n random proteins to `path`; returns the number of residues."""
  rng = np.random.default_rng(seed)
  letters = np.frombuffer(tokenizers.STANDARD_RESIDUES.encode(), np.uint8)
  total = 0
  prev = b""
  with open(path, "wb") as f:
    for i in range(n):
      if prev and rng.random() < 0.01:
        seq = prev
      else:
        seq = letters[rng.integers(0, 20, size=int(rng.choice(lengths)))].tobytes()
        if rng.random() < 0.005:
          seq = b"X" * (len(seq) // 10 + 1) + seq
      prev = seq
      total += len(seq)
      body = b"\n".join(seq[j:j + 60] for j in range(0, len(seq), 60))
      f.write(b">UniRef50_G%07d Generated protein n=1 Tax=None TaxID=0 RepID=G%07d\n%s\n"
              % (i, i, body))
  return total


def packing_padding(lengths: np.ndarray, width: int) -> float:
  """Padding of first-fit-decreasing packing of `lengths` (cropped to width) into rows."""
  free: list[int] = []
  for n in sorted(np.minimum(lengths, width).tolist(), reverse=True):
    for i, f in enumerate(free):
      if f >= n:
        free[i] -= n
        break
    else:
      free.append(width - n)
  return float(sum(free) / (len(free) * width))


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sequences", type=int, default=200_000)
  p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/sedd_prepare_bench"))
  a = p.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  logging.getLogger("sedd_jax").setLevel(logging.WARNING)
  work = a.workdir
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  results: dict = {}

  # 1. The bundled set, through the CLI as a user runs it.
  t0 = time.perf_counter()
  subprocess.run([sys.executable, "-m", "sedd_jax.data.prepare", "--output",
                  str(work / "bundled"), "--log-every", "60"], check=True, cwd=ROOT)
  results["bundled_cli_seconds"] = round(time.perf_counter() - t0, 2)
  manifest = json.loads((work / "bundled" / "manifest.json").read_text())
  results["bundled"] = {k: manifest[k] for k in ("records_read", "residues_read", "kept",
                                                 "filtered", "seconds")}
  log.info("bundled UniProt set: CLI %.2f s (prepare itself %.2f s), %d of %d kept",
           results["bundled_cli_seconds"], manifest["seconds"], manifest["kept"],
           manifest["records_read"])

  # 2. A generated FASTA, plain and gzip.
  lengths = store.open_store(work / "bundled", "train").lengths
  fa = work / "gen.fasta"
  t0 = time.perf_counter()
  residues = generate(fa, a.sequences, lengths)
  log.info("generated %s: %d sequences, %d residues, %.0f MB in %.1f s", fa, a.sequences,
           residues, fa.stat().st_size / 1e6, time.perf_counter() - t0)
  with open(fa, "rb") as src, gzip.open(work / "gen.fasta.gz", "wb", compresslevel=6) as dst:
    shutil.copyfileobj(src, dst, 1 << 22)
  for name in ("gen.fasta", "gen.fasta.gz"):
    t0 = time.perf_counter()
    m = prepare.prepare(work / name, work / f"store_{name}", log_every_s=1e9)
    dt = time.perf_counter() - t0
    r = {"seconds": round(dt, 2), "sequences": m["records_read"], "residues": m["residues_read"],
         "residues_per_s": round(m["residues_read"] / dt), "sequences_per_s": round(
             m["records_read"] / dt), "bytes": (work / name).stat().st_size, "kept": m["kept"],
         "filtered": m["filtered"]}
    results[name] = r
    log.info("%s: %.2f s, %.2fM residues/s, %.0f sequences/s, %d kept, filtered %s", name, dt,
             r["residues_per_s"] / 1e6, r["sequences_per_s"], m["kept"], m["filtered"])

  # 3. Padding fractions on the bundled store.
  results["padding"] = {}
  for length in (128, 256, 512, 1024):
    bounds = batching.default_boundaries(length)
    row = {"full": batching.padding_fraction(lengths, length),
           "bucket": batching.padding_fraction(lengths, length, bounds),
           "bucket_8": batching.padding_fraction(
               lengths, length, tuple(length * k // 8 for k in range(1, 9))),
           "packing_ffd": packing_padding(lengths, length), "bucket_boundaries": list(bounds)}
    results["padding"][length] = row
    log.info("L=%d padding fraction: full %.3f, bucket %s %.3f, 8 buckets %.3f, packing %.3f",
             length, row["full"], bounds, row["bucket"], row["bucket_8"], row["packing_ffd"])
  (work / "results.json").write_text(json.dumps(results, indent=1))
  log.info("results: %s", work / "results.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
