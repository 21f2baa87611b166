"""Tests of sedd_jax.data.pipeline: shapes, padding, crops, buckets, sharding, resuming."""

import json
import os

import numpy as np
import pytest

from helpers import FAA, PAIRS, ROOT, pipeline_config
from sedd_jax.data import batching, pipeline, prepare, store, tokenizers
from sedd_jax.data.fasta import DataError


def _is_substring(row, seq):
  n = row.size
  return any(np.array_equal(seq[s:s + n], row) for s in range(seq.size - n + 1))


def test_batch_shapes_padding_and_crops(faa_store):
  cfg = pipeline_config(faa_store)
  st = store.open_store(faa_store, "train")
  contents = [np.asarray(st[i]) for i in range(len(st))]
  it = pipeline.make_iterator(cfg, "train", batch_size=8, seed=0)
  for _ in range(5):
    b = next(it)
    assert set(b) == {"tokens", "lengths"}
    assert b["tokens"].shape == (8, 64) and b["tokens"].dtype == np.int32
    assert b["lengths"].shape == (8,) and b["lengths"].dtype == np.int32
    mask = np.arange(64)[None] < b["lengths"][:, None]
    assert np.all(b["tokens"][~mask] == tokenizers.PAD_ID)
    assert np.all((b["tokens"][mask] >= 4) & (b["tokens"][mask] <= 28))
    for row, n in zip(b["tokens"], b["lengths"]):
      assert any(_is_substring(row[:n], c) for c in contents if c.size >= n)


def test_same_seed_same_batches_other_seed_differs(faa_store):
  cfg = pipeline_config(faa_store)
  a = [next(it)["tokens"] for it in [pipeline.make_iterator(cfg, "train", 8, 3)] for _ in range(6)]
  it = pipeline.make_iterator(cfg, "train", 8, 3)
  b = [next(it)["tokens"] for _ in range(6)]
  it = pipeline.make_iterator(cfg, "train", 8, 4)
  c = [next(it)["tokens"] for _ in range(6)]
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_crops_deterministic_per_record_and_vary_by_epoch(faa_store):
  st = store.open_store(faa_store, "train")
  ex = pipeline.Examples(st, seed=0, shard_index=0, shard_count=1, shuffle=True,
                          num_epochs=None, length=32)
  n = ex.shard_size
  first = {ex.record(p): ex[p]["tokens"].tobytes() for p in range(n)}
  again = {ex.record(p): ex[p]["tokens"].tobytes() for p in range(n)}
  second = {ex.record(p): ex[p]["tokens"].tobytes() for p in range(n, 2 * n)}
  assert first == again and set(first) == set(second) == set(range(n))
  assert sum(first[r] != second[r] for r in first) > n // 2  # new crops in the next epoch


@pytest.mark.parametrize("pad_to", ["full", "bucket", "pack"])
def test_resume_from_state_yields_same_batches(faa_store, pad_to):
  # pack: several packing rounds in 19 batches
  cfg = pipeline_config(faa_store, length=128, pack_bins=12)
  it = pipeline.make_iterator(cfg, "train", 8, seed=1, pad_to=pad_to)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-able
  expected = [next(it) for _ in range(12)]
  it2 = pipeline.make_iterator(cfg, "train", 8, seed=1, pad_to=pad_to)
  it2.set_state(state)
  got = [next(it2) for _ in range(12)]
  for e, g in zip(expected, got):
    assert e.keys() == g.keys()
    for k in e:
      np.testing.assert_array_equal(e[k], g[k])


def test_one_pass_and_disjoint_shards(faa_store):
  cfg = pipeline_config(faa_store, length=1024)
  st = store.open_store(faa_store, "valid")
  everything = sorted(np.asarray(st[i]).tobytes() for i in range(len(st)))
  seen = []
  for shard in range(2):
    it = pipeline.make_iterator(cfg, "valid", 3, seed=0, shard_index=shard, shard_count=2,
                                num_epochs=1)
    rows = [r[:n].astype(np.uint8).tobytes() for b in it for r, n in zip(b["tokens"], b["lengths"])]
    seen.append(rows)
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == everything
  it = pipeline.make_iterator(cfg, "valid", 3, seed=0, num_epochs=1, drop_remainder=True)
  assert all(b["tokens"].shape[0] == 3 for b in it)
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.make_iterator(cfg, "valid", 3, seed=0, shard_index=2, shard_count=2)


def test_ensure_prepared_prepares_once(tmp_path):
  cfg = pipeline_config(tmp_path / "prep" / "x")
  out = pipeline.ensure_prepared(cfg)
  assert out == tmp_path / "prep" / "x" and store.is_prepared(out)
  stamp = (out / "manifest.json").stat().st_mtime_ns
  assert pipeline.ensure_prepared(cfg) == out
  assert (out / "manifest.json").stat().st_mtime_ns == stamp
  it = pipeline.make_iterator(cfg, "valid", 2, seed=0)
  assert next(it)["tokens"].shape == (2, 64)


def test_ensure_prepared_uses_only_a_store_of_data_fasta(faa_store, tmp_path):
  """A missing source is an error; a store prepared from another source is refused (never used
  silently), the message saying first what differs; a copy of the same source elsewhere is
  recognised by its sha256."""
  cfg = pipeline_config(faa_store)
  cfg.data.fasta = str(tmp_path / "nonexistent.fa")
  with pytest.raises(DataError, match=r"data.fasta = .*nonexistent.fa does not exist"):
    pipeline.ensure_prepared(cfg)
  records = FAA.read_text().split(">")[1:]
  fewer = "".join(">" + r for r in records[1:])
  size = FAA.stat().st_size
  others = {  # the source's name kept, or another name
      f"fewer/{FAA.name}": (fewer, f"{FAA.name}: {len(fewer)} bytes, {size} bytes when the "
                            "store was prepared"),
      f"edited/{FAA.name}": (FAA.read_text().replace("M", "A", 1),
                             rf"{FAA.name}: same size, other content \(sha256\)"),
      "renamed.faa": (FAA.read_text(), rf"files \['renamed.faa'\], \['{FAA.name}'\] when the "
                      "store was prepared")}
  for name, (text, why) in others.items():
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text(text)
    cfg.data.fasta = str(tmp_path / name)
    with pytest.raises(store.StoreError, match=rf"^data.fasta = {tmp_path / name} is not the "
                       rf"source of the store data.prepared = {faa_store} \({why}; the store "
                       rf"was prepared from {FAA}\).*--input {tmp_path / name} --output "
                       rf"{faa_store} "):
      pipeline.ensure_prepared(cfg)
  (tmp_path / FAA.name).write_bytes(FAA.read_bytes())
  cfg.data.fasta = str(tmp_path / FAA.name)
  assert pipeline.ensure_prepared(cfg) == faa_store


def test_an_edit_in_place_of_data_fasta_is_noticed(tmp_path):
  """A same-size edit of data.fasta (new modification time, same path and size) is hashed and
  refused, the message naming the file once and what changed; a new modification time alone
  (touch, same bytes) is accepted."""
  src = tmp_path / "data.faa"
  src.write_bytes(FAA.read_bytes())
  cfg = pipeline_config(tmp_path / "store")
  cfg.data.fasta = str(src)
  out = pipeline.ensure_prepared(cfg)
  (recorded,) = json.loads((out / "manifest.json").read_text())["source"]["files"]
  assert recorded["mtime_ns"] == src.stat().st_mtime_ns
  assert pipeline.ensure_prepared(cfg) == out
  st = src.stat()
  os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same content
  assert pipeline.ensure_prepared(cfg) == out
  src.write_bytes(FAA.read_bytes().replace(b"M", b"A", 1))
  os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
  assert src.stat().st_size == st.st_size
  with pytest.raises(store.StoreError) as e:
    pipeline.ensure_prepared(cfg)
  assert str(e.value) == (
      f"data.fasta = {src} changed since the store data.prepared = {out} was prepared from it "
      f"(data.faa: same size, other content (sha256)); the store is not used. Rebuild it "
      f"(python -m sedd_jax.data.prepare --input {src} --output {out} --overwrite) or point "
      f"data.prepared to a new folder (prepared on first use)")


def test_ensure_prepared_refuses_a_pairs_file_for_the_protein_task(tmp_path):
  cfg = pipeline_config(tmp_path / "store")
  cfg.data.fasta = str(PAIRS)
  with pytest.raises(DataError) as e:
    pipeline.ensure_prepared(cfg)
  assert str(e.value) == (
      f"data.fasta = {PAIRS} is a protein-ligand pairs file (format csv); the protein task "
      "trains on a FASTA file or the peers' layout: point data.fasta to one, or train the "
      "protein-ligand model on pairs with --config=configs/protein_ligand.py")
  assert list(tmp_path.iterdir()) == []


def test_data_prepared_must_be_a_store_or_new(tmp_path):
  """data.prepared naming a user's folder, a file or a path under a file: one line each
  (StoreError naming the key), nothing written."""
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  (tmp_path / "file.txt").write_text("a file")
  cases = {"mine": "is a folder that is not a prepared store",
           "file.txt": "is an existing file, not a folder",
           "file.txt/store": f"cannot be created: {tmp_path / 'file.txt'} is a file"}
  for name, what in cases.items():
    cfg = pipeline_config(tmp_path / name)
    with pytest.raises(store.StoreError, match=rf"^data.prepared = {tmp_path / name} {what}"):
      pipeline.ensure_prepared(cfg)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
  assert (tmp_path / "file.txt").read_text() == "a file"
  assert sorted(p.name for p in tmp_path.rglob("*")) == ["file.txt", "mine", "notes.txt"]


def test_an_incomplete_store_at_data_prepared_is_one_line(tmp_path):
  prepare.prepare(FAA, tmp_path / "partial")
  (tmp_path / "partial" / "valid" / "tokens.npy").unlink()
  with pytest.raises(store.StoreError, match=rf"^data.prepared: store {tmp_path / 'partial'} "
                     r"already exists, incomplete \(valid/tokens.npy is missing\) \(pass "
                     r"overwrite=True / --overwrite to replace it\)$"):
    pipeline.ensure_prepared(pipeline_config(tmp_path / "partial"))


def test_relative_paths_cwd_first_then_repo_root(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "x.faa").write_bytes(FAA.read_bytes())
  assert pipeline.resolve_path("x.faa") == tmp_path / "x.faa"
  assert pipeline.resolve_path("data/uniprot_mmseqs2_example.fasta.gz") == (
      ROOT / "data" / "uniprot_mmseqs2_example.fasta.gz")
  assert pipeline.resolve_path("data/prepared/new") == ROOT / "data" / "prepared" / "new"
  assert pipeline.resolve_path(tmp_path / "abs") == tmp_path / "abs"


def test_protein_ligand_batches(tmp_path):
  out = tmp_path / "pl"
  prepare.prepare(PAIRS, out, max_length=5000, valid_fraction=0.1, test_fraction=0.1)
  cfg = pipeline_config(out, length=256)
  cfg.data.fasta = str(PAIRS)  # the store's source
  cfg.task = "protein_ligand"
  it = pipeline.make_iterator(cfg, "train", 4, seed=0)
  b = next(it)
  assert b["tokens"].shape == (4, 256) and b["ligand_tokens"].shape == (4, 128)
  assert b["ligand_lengths"].dtype == np.int32 and b["ligand_lengths"].min() > 0
  smi = store.open_store(out).smiles_tokenizer()
  mask = np.arange(128)[None] < b["ligand_lengths"][:, None]
  assert np.all(b["ligand_tokens"][~mask] == smi.pad_id)
  assert all(smi.decode(r) for r in b["ligand_tokens"])
  with pytest.raises(ValueError, match="pad_to='pack' does not apply"):
    pipeline.make_iterator(cfg, "train", 4, seed=0, pad_to="pack")
  cfg.data.ligand_length = 16
  with pytest.raises(ValueError, match="ligand_length"):
    pipeline.make_iterator(cfg, "train", 4, seed=0)


def test_packed_rows_hold_whole_crops_with_segments_and_positions(faa_store):
  cfg = pipeline_config(faa_store, length=256, pack_bins=16)
  st = store.open_store(faa_store, "train")
  contents = [np.asarray(st[i]) for i in range(len(st))]
  it = pipeline.make_iterator(cfg, "train", 8, seed=0, pad_to="pack")
  real = total = 0
  for _ in range(6):
    b = next(it)
    assert set(b) == {"tokens", "lengths", "segment_ids", "positions"}
    for k in ("tokens", "segment_ids", "positions"):
      assert b[k].shape == (8, 256) and b[k].dtype == np.int32
    for tok, n, seg, pos in zip(b["tokens"], b["lengths"], b["segment_ids"], b["positions"]):
      # real tokens are a prefix; segments 1..S in order, contiguous; positions restart
      np.testing.assert_array_equal(seg > 0, np.arange(256) < n)
      assert np.all(tok[n:] == tokenizers.PAD_ID) and np.all(pos[n:] == 0)
      ids = seg[:n]
      assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
      assert ids.max() <= pipeline.MAX_SEGMENTS
      for s in range(1, ids.max() + 1):
        piece = tok[seg == s]
        np.testing.assert_array_equal(pos[seg == s], np.arange(piece.size))
        full = [c for c in contents if c.size >= piece.size and _is_substring(piece, c)]
        assert full and (piece.size == 256 or any(c.size == piece.size for c in full))
    real += b["lengths"].sum()
    total += b["tokens"].size
  crop_free = batching.padding_fraction(st.lengths, 256)
  assert 1 - real / total < crop_free / 3  # 5% against 22% here (1.9% / 64% bundled, L 1024)


def test_pack_settings_are_checked(faa_store):
  with pytest.raises(ValueError, match="pad_to must be one of"):
    pipeline.make_iterator(pipeline_config(faa_store), "train", 4, seed=0, pad_to="packed")
  with pytest.raises(ValueError, match="pack_bins"):
    pipeline.make_iterator(pipeline_config(faa_store, pack_bins=0), "train", 4, seed=0,
                           pad_to="pack")


def test_max_segments_agree_with_the_cudnn_layout():
  from sedd_jax.model import attention
  assert pipeline.MAX_SEGMENTS == attention.MAX_SEGMENTS
