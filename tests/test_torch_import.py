"""PyTorch state_dict <-> DDiT: round trip, name mapping, errors naming the weights."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import cases
from helpers import ddit_config as cfg
from sedd_jax import parity
from sedd_jax.model import DDiT, torch_import


def random_state_dict(model, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(v.shape).astype(np.float32)
          for k, v in torch_import.export_state_dict(model).items()}


def test_names_and_layout_match_the_reference():
  model = DDiT(cfg(), 9, True, nnx.Rngs(0))
  sd = torch_import.export_state_dict(model)
  h, c, d = 16, 8, 9
  assert sd["vocab_embed.embedding"].shape == (d, h)
  assert sd["sigma_map.mlp.0.weight"].shape == (c, 256)
  assert sd["sigma_map.mlp.2.bias"].shape == (c,)
  assert sd["blocks.1.attn_qkv.weight"].shape == (3 * h, h)
  assert sd["blocks.0.mlp.0.weight"].shape == (4 * h, h)
  assert sd["blocks.0.mlp.2.weight"].shape == (h, 4 * h)
  assert sd["blocks.0.norm1.weight"].shape == (h,)
  assert sd["blocks.0.adaLN_modulation.weight"].shape == (6 * h, c)
  assert sd["output_layer.linear.weight"].shape == (d, h)
  assert sd["output_layer.adaLN_modulation.weight"].shape == (2 * h, c)
  assert len(sd) == 1 + 4 + 2 * 10 + 5
  np.testing.assert_array_equal(sd["blocks.0.attn_qkv.weight"].T,
                                model.blocks[0].attn_qkv.kernel.get_value())


@pytest.mark.parametrize("path", sorted({p.values[0] for p in cases("model")}),
                         ids=lambda p: p.stem)
def test_fixture_names_are_exactly_the_models(path):
  fx = parity.load_fixture(path)
  names = {k[len("param/"):] for k in fx.inputs if k.startswith("param/")}
  meta = fx.meta["model"]
  absorb = fx.meta["graph"] == "absorb"
  model = DDiT(cfg(**{k: meta[k] for k in ("hidden_size", "n_heads", "n_blocks", "cond_dim",
                                            "scale_by_sigma")}),
               fx.meta["tokens"] + int(absorb), absorb, nnx.Rngs(0))
  assert set(torch_import.export_state_dict(model)) == names


def test_round_trip():
  a = DDiT(cfg(), 9, True, nnx.Rngs(0))
  sd = random_state_dict(a)
  torch_import.import_state_dict(a, sd)
  b = DDiT(cfg(), 9, True, nnx.Rngs(1))
  torch_import.import_state_dict(b, torch_import.export_state_dict(a))
  for k, v in torch_import.export_state_dict(b).items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  idx = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 9
  sigma = jnp.array([0.3, 1.0])
  a.eval(), b.eval()
  np.testing.assert_array_equal(a(idx, sigma), b(idx, sigma))


def test_prefixes_buffers_and_tensors_are_accepted():
  torch = pytest.importorskip("torch")
  model = DDiT(cfg(), 9, True, nnx.Rngs(0))
  sd = random_state_dict(model)
  tsd = {"module." + k: torch.from_numpy(v).to(torch.bfloat16 if "norm" in k else torch.float32)
         .requires_grad_(True) for k, v in sd.items()}
  tsd["module.rotary_emb.inv_freq"] = torch.ones(4)
  torch_import.import_state_dict(model, tsd)
  got = torch_import.export_state_dict(model)
  np.testing.assert_array_equal(got["blocks.0.attn_out.weight"], sd["blocks.0.attn_out.weight"])
  np.testing.assert_allclose(got["blocks.0.norm1.weight"], sd["blocks.0.norm1.weight"], rtol=1e-2)


def test_errors_name_missing_unexpected_and_mis_shaped_weights():
  model = DDiT(cfg(), 9, True, nnx.Rngs(0))
  before = torch_import.export_state_dict(model)
  sd = random_state_dict(model)
  del sd["blocks.1.mlp.2.bias"]
  del sd["output_layer.linear.weight"]
  sd["blocks.2.norm1.weight"] = np.ones(16, np.float32)
  sd["blocks.0.attn_qkv.weight"] = np.ones((48, 17), np.float32)
  with pytest.raises(torch_import.StateDictError) as err:
    torch_import.import_state_dict(model, sd)
  msg = str(err.value)
  assert "missing (2): blocks.1.mlp.2.bias, output_layer.linear.weight" in msg
  assert "unexpected (1): blocks.2.norm1.weight" in msg
  assert "blocks.0.attn_qkv.weight is (48, 17), expected (48, 16)" in msg
  assert err.value.missing == ["blocks.1.mlp.2.bias", "output_layer.linear.weight"]
  # nothing was changed
  for k, v in torch_import.export_state_dict(model).items():
    np.testing.assert_array_equal(v, before[k])


def test_infer_model_config():
  model = DDiT(cfg(n_blocks=3), 29, True, nnx.Rngs(0))
  sd = {"module." + k: v for k, v in torch_import.export_state_dict(model).items()}
  assert torch_import.infer_model_config(sd) == dict(vocab_size=29, hidden_size=16, cond_dim=8,
                                                     n_blocks=3)
  with pytest.raises(torch_import.StateDictError, match="vocab_embed.embedding"):
    torch_import.infer_model_config({"sigma_map.mlp.0.weight": np.zeros((8, 256))})
