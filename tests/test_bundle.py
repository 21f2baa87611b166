"""The model bundle: the round trip of the weights and config, the atomic and refusing writer,
errors naming the tensor, and the training data's statistics."""

import json

import numpy as np
import pytest
from flax import nnx

from helpers import sample_config
from sedd_jax import bundle
from sedd_jax import diffusion
from sedd_jax.data import pipeline
from sedd_jax.data import reference
from sedd_jax.data import tokenizers
from sedd_jax.training import state as state_lib

SOURCE = {"run": "/runs/r", "checkpoint": "/runs/r/checkpoints/7", "step": 7, "weights": "ema"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(config of helpers.sample_config with its data prepared, a randomised model of it)."""
  tmp = tmp_path_factory.mktemp("bundle")
  cfg = sample_config(tmp)
  pipeline.ensure_prepared(cfg)
  model = state_lib.build_model(cfg, diffusion.get_graph(cfg.graph), seed=1)
  rng = np.random.default_rng(0)
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      var.set_value(rng.standard_normal(var.get_value().shape).astype(np.float32))
  return cfg, model


def test_write_then_load_gives_the_same_parameters_and_config(prepared, tmp_path):
  cfg, model = prepared
  out = bundle.write(tmp_path / "b", model, cfg, source=SOURCE)
  assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                   "model.safetensors"]
  assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary folder left
  loaded, cfg2, graph, noise, meta = bundle.load(out)
  want, got = bundle.flat_params(model), bundle.flat_params(loaded)
  assert want.keys() == got.keys() and "blocks.0.attn_qkv.kernel" in want
  for name in want:  # bit for bit
    assert got[name].dtype == want[name].dtype
    np.testing.assert_array_equal(got[name], want[name])
  assert cfg2.to_dict() == cfg.to_dict() == bundle.read_config(out).to_dict()
  assert graph == diffusion.get_graph(cfg.graph) and noise == diffusion.get_noise(cfg.noise)
  assert meta["source"] == SOURCE and meta["sedd_jax_version"] == bundle.version()
  assert meta["vocabulary"] == {"protein": list(tokenizers.ESM2_ALPHABET)}
  assert bundle.is_bundle(out) and not bundle.is_bundle(tmp_path)
  assert bundle.read_data_stats(out) is None


def test_writer_refuses_files_folders_and_bundles_without_overwrite(prepared, tmp_path):
  cfg, model = prepared
  (tmp_path / "file").write_text("keep")
  (tmp_path / "user").mkdir()
  (tmp_path / "user" / "notes.txt").write_text("keep")
  for name, match in (("file", "exists and is not a folder"),
                      ("user", "is a folder that is not a sedd_jax bundle")):
    with pytest.raises(ValueError, match=match):
      bundle.write(tmp_path / name, model, cfg, source=SOURCE)
  assert (tmp_path / "file").read_text() == "keep"
  assert (tmp_path / "user" / "notes.txt").read_text() == "keep"
  (tmp_path / "empty").mkdir()
  out = bundle.write(tmp_path / "empty", model, cfg, source=SOURCE)  # an empty folder is used
  with pytest.raises(ValueError, match="is a bundle already; pass overwrite"):
    bundle.write(out, model, cfg, source=SOURCE)
  bundle.write(out, model, cfg, source={**SOURCE, "step": 8}, overwrite=True)
  assert bundle.read_meta(out)["source"]["step"] == 8
  (out / "mine.txt").write_text("keep")
  with pytest.raises(ValueError, match=r"holding other files too \(mine.txt\)"):
    bundle.write(out, model, cfg, source=SOURCE, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "user"]


def test_load_names_the_tensor_that_does_not_fit(prepared, tmp_path):
  from safetensors import numpy as st_numpy

  cfg, model = prepared
  out = bundle.write(tmp_path / "b", model, cfg, source=SOURCE)
  tensors = st_numpy.load_file(str(out / bundle.WEIGHTS))
  name = "blocks.0.attn_qkv.kernel"
  bad = dict(tensors, **{name: tensors[name][:, :-1]})
  st_numpy.save_file(bad, str(out / bundle.WEIGHTS))
  with pytest.raises(ValueError, match=rf"tensor '{name}' is float32 \(32, 95\); the model of its "
                     r"config needs float32 \(32, 96\)"):
    bundle.load(out)
  st_numpy.save_file({k: v for k, v in tensors.items() if k != name}, str(out / bundle.WEIGHTS))
  with pytest.raises(ValueError, match=rf"missing tensor '{name}' \(1 in all\)"):
    bundle.load(out)
  st_numpy.save_file(dict(tensors, extra=tensors[name]), str(out / bundle.WEIGHTS))
  with pytest.raises(ValueError, match=r"unknown tensor 'extra' \(1 in all\)"):
    bundle.load(out)
  (out / bundle.WEIGHTS).write_bytes(b"not safetensors")
  with pytest.raises(ValueError, match="cannot be read as safetensors"):
    bundle.load(out)
  (out / bundle.CONFIG).write_text("{")
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    bundle.load(out)
  (out / bundle.CONFIG).write_text(json.dumps({"bundle_format": 99}))
  with pytest.raises(ValueError, match="bundle_format 99; this sedd_jax"):
    bundle.load(out)


def test_data_stats_are_the_training_split_and_round_trip(prepared, tmp_path):
  cfg, model = prepared
  stats = bundle.data_stats(cfg)
  split = reference.training_split(cfg)
  t = stats.tracks["protein"]
  assert list(stats.tracks) == ["protein"]
  lengths = np.asarray(split.lengths)
  assert t.num_sequences == len(split) and t.num_tokens == lengths.sum()
  for v, c in zip(t.length_values, t.length_counts):
    assert (lengths == v).sum() == c
  ids = np.concatenate(list(reference.training_tokens(cfg)))
  assert t.token_counts == {a: int((ids == i).sum())
                            for i, a in enumerate(tokenizers.ESM2_ALPHABET)}
  # Lengths drawn from the histogram: its support, capped, at its frequencies.
  drawn = t.draw_lengths(20000, np.random.default_rng(0), 300)
  assert drawn.dtype == np.int32 and set(drawn) <= set(np.minimum(t.length_values, 300))
  share = (lengths >= 300).mean()
  assert abs((drawn == 300).mean() - share) < 4 * np.sqrt(share * (1 - share) / 20000)
  out = bundle.write(tmp_path / "b", model, cfg, source=SOURCE, stats=stats,
                     evals=[("eval_valid.json", {"data": "x:valid", "nelbo_per_token": 2.5,
                                                 "perplexity": 12.18})])
  back = bundle.read_data_stats(out)
  assert back.to_json() == stats.to_json() and back.source == str(split.root)
  card = (out / bundle.README).read_text()
  assert "`eval_valid.json` (x:valid): negative ELBO (nats/token) 2.5, perplexity 12.18" in card
  assert f"protein: {len(split):,} training sequences" in card
  assert "step 7" in card


def test_no_data_no_stats(tmp_path):
  cfg = sample_config(tmp_path)  # never prepared
  assert bundle.data_stats(cfg) is None
  with pytest.raises(ValueError, match=r"tracks.protein: not a track's statistics"):
    bundle.DataStats.from_json({"tracks": {"protein": {"length_histogram": {}}}}, "f.json")
