"""python -m sedd_jax.convert on .pth files written with torch.save from a parity fixture."""

import argparse
import collections
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, UNIREF50, cases, subprocess_env
from sedd_jax import config as config_lib
from sedd_jax import convert, parity
from sedd_jax.model import torch_import



def _fixture():
  paths = [p.values[0] for p in cases("model")]
  absorb = [p for p in paths if parity.load_fixture(p).meta["graph"] == "absorb"]
  if not absorb:
    pytest.skip("no absorbing model fixture")
  return parity.load_fixture(absorb[0])


def _reference_state_dict(fx, torch, scale=1.0):
  """The fixture's weights in the reference's state_dict order, with its rotary buffer."""
  params = {k[len("param/"):]: v for k, v in fx.inputs.items() if k.startswith("param/")}
  sd = collections.OrderedDict()
  for k, v in params.items():
    if k.startswith("blocks.0.") and "rotary_emb.inv_freq" not in sd:
      h = fx.meta["model"]["hidden_size"] // fx.meta["model"]["n_heads"]
      sd["rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, h, 2).float() / h)
    sd[k] = torch.from_numpy(np.array(v) * scale)
  return sd


def _cfg(fx):
  meta = fx.meta["model"]
  return config_lib.load_config(f"{UNIREF50}:tiny", [
      f"model.n_heads={meta['n_heads']}", "model.attention=xla", "model.dtype=float32",
      f"graph.type={fx.meta['graph']}", f"model.scale_by_sigma={meta['scale_by_sigma']}"])


def _check_log_score(model, fx):
  from flax import nnx
  out = nnx.jit(lambda m, i, s: m(i, s))(model, jnp.asarray(fx.inputs["indices"], jnp.int32),
                                         jnp.asarray(fx.inputs["sigma"]))
  expected = fx.outputs["log_score"]
  assert float(np.max(np.abs(np.asarray(out) - expected))) <= parity.tolerance(expected)


def test_convert_reference_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  from sedd_jax.training import checkpoint
  fx = _fixture()
  sd = _reference_state_dict(fx, torch)
  ema = {"decay": 0.9999, "num_updates": 7,
         "shadow_params": [v * 0.5 for k, v in sd.items() if k != "rotary_emb.inv_freq"]}
  pth = tmp_path / "ref.pth"
  torch.save({"model": {"module." + k: v for k, v in sd.items()}, "ema": ema, "step": 7,
              "optimizer": {"state": {}, "param_groups": []}}, pth)

  step_dir = convert.convert(pth, tmp_path / "out", _cfg(fx))
  assert step_dir == (tmp_path / "out" / "checkpoints" / "7").absolute()
  assert (tmp_path / "out" / "config.json").is_file()
  model, cfg, graph, _ = checkpoint.load_for_inference(tmp_path / "out")
  assert cfg.model.hidden_size == fx.meta["model"]["hidden_size"]  # read from the weights
  assert cfg.model.n_blocks == fx.meta["model"]["n_blocks"]
  assert cfg.graph.tokens == fx.meta["tokens"] and graph.dim == fx.meta["tokens"] + 1
  _check_log_score(model, fx)

  # the EMA weights, through the command line
  cmd = [sys.executable, "-m", "sedd_jax.convert", "--input", str(pth), "--output",
         str(tmp_path / "ema"), "--config", f"{UNIREF50}:tiny",
         f"--config.model.n_heads={fx.meta['model']['n_heads']}", "--use-ema"]
  res = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  model, _, _, _ = checkpoint.load_for_inference(tmp_path / "ema")
  got = torch_import.export_state_dict(model)
  want = fx.inputs["param/blocks.1.mlp.0.weight"] * 0.5
  np.testing.assert_array_equal(got["blocks.1.mlp.0.weight"], want)


def test_convert_plain_state_dict(tmp_path):
  torch = pytest.importorskip("torch")
  fx = _fixture()
  pth = tmp_path / "plain.pth"
  torch.save(_reference_state_dict(fx, torch), pth)
  with pytest.raises(convert.ConvertError, match="without EMA"):
    convert.convert(pth, tmp_path / "x", _cfg(fx), use_ema=True)
  step_dir = convert.convert(pth, tmp_path / "out", _cfg(fx))
  assert step_dir.name == "0"
  with pytest.raises(convert.ConvertError, match="exists already"):
    convert.convert(pth, tmp_path / "out", _cfg(fx))


def test_heads_that_do_not_fit_are_reported(tmp_path):
  torch = pytest.importorskip("torch")
  fx = _fixture()
  pth = tmp_path / "plain.pth"
  torch.save(_reference_state_dict(fx, torch), pth)
  cfg = _cfg(fx)
  cfg.model.n_heads = 3
  with pytest.raises(convert.ConvertError, match="model.n_heads"):
    convert.convert(pth, tmp_path / "out", cfg)


def test_bad_inputs_are_named():
  w = np.zeros((4, 4), np.float32)
  with pytest.raises(convert.ConvertError, match="neither a state_dict"):
    convert.select_state_dict({"optimizer": {}})
  with pytest.raises(convert.ConvertError, match="no 'ema'"):
    convert.select_state_dict({"model": {"a": w}}, use_ema=True)
  with pytest.raises(convert.ConvertError, match="1 tensors but the model state_dict has 2"):
    convert.select_state_dict({"model": {"a": w, "b": w}, "ema": {"shadow_params": [w]}},
                              use_ema=True)
  got = convert.select_state_dict({"model": {"module.a": w}, "ema": {"module.a": w + 1}},
                                  use_ema=True)
  np.testing.assert_array_equal(got["a"], w + 1)


def test_missing_torch_is_explained(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(convert.ConvertError, match=r"sedd_jax\[torch\]"):
    convert.load_torch_file(tmp_path / "x.pth")


def test_files_that_are_no_torch_checkpoint_are_named(tmp_path):
  """A Python file, a FASTA file or a truncated checkpoint is reported as such, with or without
  --allow_pickle; --allow_pickle is offered only for a checkpoint holding other objects."""
  torch = pytest.importorskip("torch")
  py = tmp_path / "train.py"
  py.write_text("import torch\nprint('hi')\n")
  fa = tmp_path / "seqs.fasta"
  fa.write_text(">a\nMKV\n")
  for path in (py, fa):
    for allow in (False, True):
      with pytest.raises(convert.ConvertError, match="is not a PyTorch checkpoint") as e:
        convert.load_torch_file(path, allow_pickle=allow)
      assert "--allow_pickle" not in str(e.value)
  good = tmp_path / "good.pth"
  torch.save({"model": {"w": torch.zeros(3)}, "extra": argparse.Namespace(a=1)}, good)
  with pytest.raises(convert.ConvertError, match="retry with --allow_pickle"):
    convert.load_torch_file(good)
  assert convert.load_torch_file(good, allow_pickle=True)["extra"].a == 1
  cut = tmp_path / "cut.pth"
  cut.write_bytes(good.read_bytes()[:200])
  with pytest.raises(convert.ConvertError, match="truncated or corrupt zip archive"):
    convert.load_torch_file(cut)


def test_outputs_that_would_lose_the_input_are_refused_before_reading_it(tmp_path):
  """--output as the input file, an existing file, or the folder whose config.json is the
  input: refused before the input is read (any bytes do), the input left as it was."""
  pth = tmp_path / "ref.pth"
  pth.write_bytes(b"not read")
  other = tmp_path / "other.txt"
  other.write_text("x")
  run = tmp_path / "run"
  run.mkdir()
  inside = run / "config.json"
  inside.write_bytes(b"a checkpoint named config.json")
  cfg = config_lib.load_config(f"{UNIREF50}:tiny")
  for src, out, match in (
      (pth, pth, f"--output {pth} would overwrite --input {pth} (the same file)"),
      (pth, other, f"--output {other} exists and is not a folder"),
      (inside, run, f"--output's config.json {inside} would overwrite --input {inside}")):
    with pytest.raises(convert.ConvertError, match=re.escape(match)):
      convert.convert(src, out, cfg)
  assert pth.read_bytes() == b"not read" and other.read_text() == "x"
  assert inside.read_bytes() == b"a checkpoint named config.json"
  assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_help_exits_0():
  res = subprocess.run([sys.executable, "-m", "sedd_jax.convert", "--help"], capture_output=True,
                       text=True, env=subprocess_env(PYTHONPATH=str(ROOT)), timeout=120)
  assert res.returncode == 0, res.stderr
  assert "--input" in res.stdout and "PyTorch checkpoint" in res.stdout
