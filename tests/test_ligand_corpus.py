"""Unpaired ligands (`data.ligand_corpus`): the reader, the tokenized corpus, its batches and the
`ligand_only` loss on them."""

import gzip
import re

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import PAIRS, ROOT, pipeline_config
from helpers import protein_ligand_batch as make_batch
from helpers import protein_ligand_config as pl_config
from helpers import protein_ligand_model as make_model
from sedd_jax.data import ligand_corpus, pipeline, prepare, store, tokenizers
from sedd_jax.data.fasta import DataError
from sedd_jax.protein_ligand import modes

MOSES = ROOT / "data" / "moses_smiles_every8.csv.gz"
TOK = tokenizers.SmilesTokenizer(["(", ")", "1", "=", "C", "N", "O", "c", "n"])


def _write(path, text):
  path.write_text(text)
  return path


def test_reader_csv_tsv_and_smi(tmp_path):
  csv_file = _write(tmp_path / "a.csv", "id,SMILES,x\n1,CCO,a\n\n2,c1ccccc1,b\n3,,c\n")
  assert list(ligand_corpus.read_smiles(csv_file)) == [("CCO", 2), ("c1ccccc1", 4)]
  tsv = _write(tmp_path / "a.tsv", "smiles\tname\nCCN\tm1\n")
  assert list(ligand_corpus.read_smiles(tsv)) == [("CCN", 2)]
  smi = _write(tmp_path / "a.smi", "CCO ethanol\n\nC=O\n")
  assert list(ligand_corpus.read_smiles(smi)) == [("CCO", 1), ("C=O", 3)]
  gz = tmp_path / "a.csv.gz"
  gz.write_bytes(gzip.compress(b"SMILES\nCCO\nCCN\n" * 50)[:-30])
  with pytest.raises(DataError, match=r"a\.csv\.gz:\d+: truncated or corrupt gzip"):
    list(ligand_corpus.read_smiles(gz))
  with pytest.raises(DataError, match="empty file"):
    list(ligand_corpus.read_smiles(_write(tmp_path / "e.smi", "\n")))


def test_load_skips_foreign_and_long_smiles_and_round_trips(tmp_path):
  src = _write(tmp_path / "c.smi", "CCO\nC[Si]C\nc1ccncc1\nCCCCCCCCC\nC#N\nN=O\n")
  corpus = ligand_corpus.load(src, TOK, max_length=8)
  assert len(corpus) == 3 and corpus.skipped == {"unknown_token": 2, "too_long": 1}
  assert [TOK.decode(corpus[i]) for i in range(3)] == ["CCO", "c1ccncc1", "N=O"]
  with pytest.raises(DataError, match="data.ligand_corpus = .*none of its 2 SMILES is usable"):
    ligand_corpus.load(_write(tmp_path / "bad.smi", "[Si]\nC#C\n"), TOK, max_length=8)
  with pytest.raises(DataError, match="data.ligand_corpus = .*missing.smi does not exist"):
    ligand_corpus.load(tmp_path / "missing.smi", TOK, max_length=8)


def test_draws_are_uniform_and_depend_on_seed_shard_and_position(tmp_path):
  corpus = ligand_corpus.load(_write(tmp_path / "c.smi", "C\nN\nO\nCC\nCN\n"), TOK, 8)
  draws = np.array([corpus.draw(0, 0, p) for p in range(5000)])
  counts = np.bincount(draws, minlength=5)
  chi2 = ((counts - 1000) ** 2 / 1000).sum()
  assert chi2 < 18.5  # chi-square, 4 degrees of freedom: p = 0.001
  assert corpus.draw(0, 0, 7) == corpus.draw(0, 0, 7)
  others = [[corpus.draw(*a, p) for p in range(40)] for a in ((1, 0), (0, 1))]
  assert all(o != list(draws[:40]) for o in others)


def test_bundled_moses_corpus_with_the_bundled_pairs_vocabulary():
  """Brute force: the SMILES the loader keeps are those whose regex tokens all lie in the
  vocabulary and number at most 128."""
  tok = tokenizers.SmilesTokenizer(["#", "(", ")", "1", "2", "3", "4", "5", "6", "=", "Br", "C",
                                    "Cl", "F", "N", "O", "S", "[nH]", "c", "n", "o", "s"])
  corpus = ligand_corpus.load(MOSES, tok, max_length=128)
  lines = gzip.decompress(MOSES.read_bytes()).decode().splitlines()
  assert lines[0] == "SMILES" and len(lines) == 198_084
  allowed = set(tok.vocab[len(tokenizers.SMILES_SPECIALS):-1])
  rx = re.compile(tokenizers.SMILES_REGEX)
  kept = [s for s in lines[1:] if set(rx.findall(s)) <= allowed and len(rx.findall(s)) <= 128]
  assert len(corpus) == len(kept) and sum(corpus.skipped.values()) == 198_083 - len(kept)
  for i in (0, 1, len(kept) // 2, len(kept) - 1):
    assert tok.decode(corpus[i]) == kept[i]


@pytest.fixture(scope="module")
def pl_store(tmp_path_factory):
  out = tmp_path_factory.mktemp("pl") / "store"
  prepare.prepare(PAIRS, out, max_length=5000, valid_fraction=0.1, test_fraction=0.1)
  return out


def test_batches_carry_corpus_ligands_and_resume(pl_store, tmp_path):
  cfg = pipeline_config(pl_store, length=256)
  cfg.data.fasta = str(PAIRS)
  cfg.task = "protein_ligand"
  smi = store.open_store(pl_store).smiles_tokenizer()
  pair_smiles = [smi.decode(store.open_store(pl_store).get(i, "ligand")) for i in range(8)]
  src = _write(tmp_path / "c.smi", "\n".join(pair_smiles + ["C[Si]C"]) + "\n")
  cfg.data.ligand_corpus = str(src)
  it = pipeline.make_iterator(cfg, "train", 4, seed=0)
  for _ in range(3):
    next(it)
  state = it.get_state()
  b = next(it)
  assert b["corpus_ligand_tokens"].shape == (4, 128) and b["corpus_ligand_lengths"].shape == (4,)
  for row, n in zip(b["corpus_ligand_tokens"], b["corpus_ligand_lengths"]):
    assert smi.decode(row[:n]) in pair_smiles and np.all(row[n:] == smi.pad_id)
  again = pipeline.make_iterator(cfg, "train", 4, seed=0)
  again.set_state(state)
  assert all(np.array_equal(b[k], v) for k, v in next(again).items())


def test_corpus_needs_a_ligand_store(faa_store, tmp_path):
  cfg = pipeline_config(faa_store)
  cfg.data.ligand_corpus = str(_write(tmp_path / "c.smi", "CCO\n"))
  with pytest.raises(ValueError, match="data.ligand_corpus = .* has no ligand track"):
    pipeline.make_iterator(cfg, "train", 4, seed=0)


def _corpus_cfg(fraction):
  cfg = pl_config("ligand_only", frozen=False)
  cfg.data.ligand_corpus = "corpus.smi"
  cfg.data.ligand_corpus_fraction = fraction
  return cfg


def test_ligand_only_trains_on_the_corpus_by_its_fraction():
  model = make_model(pl_config("ligand_only"))
  batch, other = make_batch(0), make_batch(1)
  with_corpus = {**batch, "corpus_ligand_tokens": other["ligand_tokens"],
                 "corpus_ligand_lengths": other["ligand_lengths"]}
  swapped = {**batch, "ligand_tokens": other["ligand_tokens"],
             "ligand_lengths": other["ligand_lengths"]}
  key = jax.random.key(3)
  loss = nnx.jit(lambda m, b, cfg: modes.loss_fn(m, b, key, 0, cfg)[0], static_argnums=2)
  plain = pl_config("ligand_only")
  one, zero = (ml_collections.FrozenConfigDict(_corpus_cfg(f)) for f in (1.0, 0.0))
  assert float(loss(model, with_corpus, one)) == float(loss(model, swapped, plain))
  assert float(loss(model, with_corpus, zero)) == float(loss(model, batch, plain))
  assert float(loss(model, batch, plain)) != float(loss(model, swapped, plain))
  # The evaluation measures the pairs, corpus or not.
  ev = modes.eval_loss_fn(model, with_corpus, key, one)["loss"]
  assert float(ev) == float(modes.eval_loss_fn(model, batch, key, plain)["loss"])
  with pytest.raises(ValueError, match="lacks .*corpus_ligand_tokens"):
    modes.loss_fn(model, batch, key, 0, one)
  with pytest.raises(ValueError, match=r"data.ligand_corpus_fraction = 1.5 must be in \[0, 1\]"):
    modes.batch_keys(_corpus_cfg(1.5))
