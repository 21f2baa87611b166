"""Rebuilds the bundled data files (data/*.gz) and the test fixtures (tests/data/) from packages.

  apt-get install -y mmseqs2-examples            # UniProt sequences (CC BY 4.0)
  python scripts/build_bundled_data.py           # downloads the three wheels with pip --no-deps

Sources:
  * /usr/share/doc/mmseqs2/example-data/DB.fasta.gz (Debian package mmseqs2-examples): 20,000
    UniProt sequences -> data/uniprot_mmseqs2_example.fasta.gz, exact duplicates removed (first
    occurrence kept, headers as in the source, one line per sequence).
  * pydebiaseddta wheel, pydebiaseddta/data/dta/dta_sample_data/{train,val,test}.csv (MIT):
    5,000 protein-ligand pairs -> data/protein_ligand_pairs.csv.gz, the three files concatenated
    with a `source_split` column.
  * pyhmmer wheel, pyhmmer/tests/data/seqs/938293.PRJEB85.HG003687.faa (MIT): its first 200
    proteins -> tests/data/pyhmmer_938293_first200.faa; the first 60 rows of the pydebiaseddta
    test.csv -> tests/data/pairs_first60.csv.
  * molsets 0.3.1 wheel (MOSES benchmark), moses/dataset/data/train.csv.gz (MIT): every 8th of
    its 1,584,663 drug-like SMILES (data rows 0, 8, 16, ...) -> data/moses_smiles_every8.csv.gz,
    198,083 SMILES under the header `SMILES`.

The outputs are deterministic (gzip without a timestamp), so a rebuild gives identical bytes.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import logging
import pathlib
import subprocess
import sys
import tempfile
import zipfile

log = logging.getLogger("build_bundled_data")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEBIAN_DB = pathlib.Path("/usr/share/doc/mmseqs2/example-data/DB.fasta.gz")
PAIRS_MEMBER = "pydebiaseddta/data/dta/dta_sample_data/{}.csv"
FAA_MEMBER = "pyhmmer/tests/data/seqs/938293.PRJEB85.HG003687.faa"
MOSES_MEMBER = "moses/dataset/data/train.csv.gz"


def _gzip_bytes(data: bytes) -> bytes:
  buf = io.BytesIO()
  with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
    f.write(data)
  return buf.getvalue()


def _find_wheel(directory: pathlib.Path, name: str) -> pathlib.Path:
  wheels = sorted(directory.glob(f"{name}-*.whl"))
  if wheels:
    return wheels[-1]
  log.info("pip download --no-deps %s", name)
  subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                  str(directory), name], check=True)
  wheels = sorted(directory.glob(f"{name}-*.whl"))
  if not wheels:
    raise FileNotFoundError(f"pip download of {name} gave no wheel in {directory}")
  return wheels[-1]


def build_uniprot(db: pathlib.Path, out: pathlib.Path) -> None:
  if not db.exists():
    raise FileNotFoundError(f"{db} missing: apt-get install -y mmseqs2-examples")
  seen: set[bytes] = set()
  lines: list[bytes] = []
  header, chunks, n = None, [], 0

  def flush():
    nonlocal n
    seq = b"".join(chunks)
    key = hashlib.blake2b(seq.upper(), digest_size=16).digest()
    n += 1
    if key not in seen:
      seen.add(key)
      lines.extend([header.rstrip(), seq])

  with gzip.open(db, "rb") as f:
    for line in f:
      line = line.rstrip(b"\r\n")
      if line.startswith(b">"):
        if header is not None:
          flush()
        header, chunks = line, []
      elif line.strip():
        chunks.append(line.strip())
  if header is not None:
    flush()
  out.write_bytes(_gzip_bytes(b"\n".join(lines) + b"\n"))
  log.info("%s: %d of %d sequences kept (unique), %d bytes", out, len(seen), n,
           out.stat().st_size)


def build_pairs(wheel: pathlib.Path, out: pathlib.Path, fixture: pathlib.Path) -> None:
  rows, header = [], None
  with zipfile.ZipFile(wheel) as z:
    for split in ("train", "val", "test"):
      text = z.read(PAIRS_MEMBER.format(split)).decode("utf-8")
      reader = csv.reader(io.StringIO(text))
      h = next(reader)
      if header is None:
        header = h
      elif h != header:
        raise ValueError(f"{split}.csv header {h} differs from {header}")
      body = [r + [split] for r in reader if r]
      rows.extend(body)
      if split == "test":
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([h] + [r[:-1] for r in body[:60]])
        fixture.write_text(buf.getvalue())
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(header + ["source_split"])
  w.writerows(rows)
  out.write_bytes(_gzip_bytes(buf.getvalue().encode("utf-8")))
  log.info("%s: %d pairs, %d bytes; %s", out, len(rows), out.stat().st_size, fixture)


def build_faa_fixture(wheel: pathlib.Path, out: pathlib.Path, count: int = 200) -> None:
  with zipfile.ZipFile(wheel) as z:
    text = z.read(FAA_MEMBER).decode("ascii")
  records = text.split("\n>")
  out.write_text(">".join([""] + [r.lstrip(">").rstrip("\n") + "\n" for r in records[:count]]))
  log.info("%s: %d of %d records", out, min(count, len(records)), len(records))


def build_moses(wheel: pathlib.Path, out: pathlib.Path, every: int = 8) -> None:
  with zipfile.ZipFile(wheel) as z:
    text = gzip.decompress(z.read(MOSES_MEMBER)).decode("ascii")
  lines = text.rstrip("\n").split("\n")
  if lines[0] != "SMILES":
    raise ValueError(f"{MOSES_MEMBER} header {lines[0]!r}, expected 'SMILES'")
  kept = lines[1::every]
  out.write_bytes(_gzip_bytes("\n".join([lines[0]] + kept).encode("ascii") + b"\n"))
  log.info("%s: %d of %d SMILES (every %d), %d bytes", out, len(kept), len(lines) - 1, every,
           out.stat().st_size)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--db", type=pathlib.Path, default=DEBIAN_DB)
  p.add_argument("--wheels", type=pathlib.Path, default=None,
                 help="folder holding (or receiving) the pydebiaseddta, pyhmmer and molsets "
                 "wheels")
  a = p.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  (ROOT / "data").mkdir(exist_ok=True)
  (ROOT / "tests" / "data").mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    wheels = a.wheels or pathlib.Path(tmp)
    build_uniprot(a.db, ROOT / "data" / "uniprot_mmseqs2_example.fasta.gz")
    build_pairs(_find_wheel(wheels, "pydebiaseddta"), ROOT / "data" / "protein_ligand_pairs.csv.gz",
                ROOT / "tests" / "data" / "pairs_first60.csv")
    build_faa_fixture(_find_wheel(wheels, "pyhmmer"),
                      ROOT / "tests" / "data" / "pyhmmer_938293_first200.faa")
    build_moses(_find_wheel(wheels, "molsets"), ROOT / "data" / "moses_smiles_every8.csv.gz")
  return 0


if __name__ == "__main__":
  sys.exit(main())
