"""PyTorch SEDD state_dict <-> DDiT parameters (no torch import here).

Names follow the reference's `SEDD` module (see shared/parity/README.md), e.g.
`blocks.0.attn_qkv.weight (3H, H)`. The NNX path of a parameter maps to its torch name by
renaming `mlp_in` -> `mlp.0`, `mlp_out` -> `mlp.2`, and the leaf `kernel` (stored (in, out),
transposed from torch's (out, in)) or LayerNorm `scale` -> `weight`.

Values may be numpy arrays, jax arrays, or torch tensors (converted by duck typing:
`.detach().cpu()`, bfloat16/float16 -> float32, `.numpy()`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

log = logging.getLogger(__name__)

MODULE_RENAMES = {"mlp_in": "mlp.0", "mlp_out": "mlp.2"}
# Buffers of the reference module that hold no learned weights (recomputed here).
IGNORED_KEYS = ("rotary_emb.inv_freq",)
PREFIXES = ("module.", "_orig_mod.")


class StateDictError(ValueError):
  """A state_dict that does not fit the model: lists missing, unexpected, mis-shaped names."""

  def __init__(self, missing=(), unexpected=(), mis_shaped=()):
    self.missing = sorted(missing)
    self.unexpected = sorted(unexpected)
    self.mis_shaped = list(mis_shaped)  # (name, got shape, expected shape), torch layout
    lines = ["state_dict does not match the DDiT model:"]
    if self.missing:
      lines.append(f"  missing ({len(self.missing)}): {', '.join(self.missing)}")
    if self.unexpected:
      lines.append(f"  unexpected ({len(self.unexpected)}): {', '.join(self.unexpected)}")
    for name, got, want in self.mis_shaped:
      lines.append(f"  mis-shaped: {name} is {tuple(got)}, expected {tuple(want)}")
    super().__init__("\n".join(lines))


def to_numpy(value: Any) -> np.ndarray:
  """numpy / jax array / torch tensor (duck-typed) -> numpy array (float32 for half floats)."""
  if hasattr(value, "detach"):
    value = value.detach()
  if hasattr(value, "cpu") and not isinstance(value, np.ndarray):
    value = value.cpu()
  if hasattr(value, "float") and str(getattr(value, "dtype", "")) in ("torch.bfloat16",
                                                                      "torch.float16"):
    value = value.float()
  if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
    value = value.numpy()
  arr = np.asarray(value)
  if arr.dtype.kind == "f" and arr.dtype != np.float32:
    arr = arr.astype(np.float32)
  return arr


def strip_prefixes(state_dict: Mapping[str, Any], prefixes=PREFIXES) -> dict[str, Any]:
  """Removes DDP's `module.` / torch.compile's `_orig_mod.` prefixes from every name."""
  out = {}
  for name, value in state_dict.items():
    stripped = True
    while stripped:
      stripped = False
      for p in prefixes:
        if name.startswith(p):
          name, stripped = name[len(p):], True
    out[name] = value
  return out


def torch_name(path: tuple) -> tuple[str, bool]:
  """NNX parameter path -> (torch state_dict name, whether the array is transposed)."""
  *modules, leaf = [str(p) for p in path]
  modules = [MODULE_RENAMES.get(m, m) for m in modules]
  if leaf == "kernel":
    return ".".join(modules + ["weight"]), True
  if leaf == "scale":
    return ".".join(modules + ["weight"]), False
  return ".".join(modules + [leaf]), False


def _param_table(model: nnx.Module) -> dict[str, tuple[nnx.Variable, bool]]:
  """torch name -> (the model's nnx.Param, transposed?)."""
  table = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param):
      name, transposed = torch_name(path)
      if name in table:
        raise RuntimeError(f"two parameters map to the torch name {name!r}")
      table[name] = (node, transposed)
  return table


def export_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters as a PyTorch-layout state_dict (numpy float32; Linear (out, in))."""
  out = {}
  for name, (var, transposed) in _param_table(model).items():
    arr = np.asarray(var.get_value())
    out[name] = np.ascontiguousarray(arr.T if transposed else arr)
  return out


def import_state_dict(model: nnx.Module, state_dict: Mapping[str, Any]) -> nnx.Module:
  """Loads a PyTorch-layout state_dict into `model` in place (and returns it).

  Names are matched exactly after stripping `module.` prefixes; `rotary_emb.inv_freq` is
  ignored. Raises StateDictError listing every missing, unexpected and mis-shaped weight; the
  model is left unchanged in that case.
  """
  sd = strip_prefixes(state_dict)
  table = _param_table(model)
  missing = [n for n in table if n not in sd]
  unexpected = [n for n in sd if n not in table and n not in IGNORED_KEYS]
  mis_shaped, updates = [], []
  for name, (var, transposed) in table.items():
    if name not in sd:
      continue
    arr = to_numpy(sd[name])
    want = var.get_value().shape
    want_torch = tuple(reversed(want)) if transposed else tuple(want)
    if arr.shape != want_torch:
      mis_shaped.append((name, arr.shape, want_torch))
      continue
    updates.append((var, arr.T if transposed else arr))
  if missing or unexpected or mis_shaped:
    raise StateDictError(missing, unexpected, mis_shaped)
  for var, arr in updates:
    old = var.get_value()
    var.set_value(np.ascontiguousarray(arr).astype(old.dtype))
  log.info("imported %d weights into DDiT", len(updates))
  return model


def infer_model_config(state_dict: Mapping[str, Any]) -> dict[str, int]:
  """Shape settings readable from a reference state_dict.

  Returns hidden_size, cond_dim, n_blocks, vocab_size (D). n_heads cannot be inferred.
  Raises StateDictError if a needed weight is missing.
  """
  sd = strip_prefixes(state_dict)
  need = ("vocab_embed.embedding", "sigma_map.mlp.0.weight")
  missing = [n for n in need if n not in sd]
  if missing:
    raise StateDictError(missing=missing)
  emb = sd["vocab_embed.embedding"].shape
  blocks = {int(n.split(".")[1]) for n in sd
            if n.startswith("blocks.") and n.split(".")[1].isdigit()}
  if blocks != set(range(len(blocks))):
    raise StateDictError(missing=[f"blocks.{i}.*" for i in range(max(blocks) + 1)
                                  if i not in blocks])
  return {
      "vocab_size": int(emb[0]),
      "hidden_size": int(emb[1]),
      "cond_dim": int(sd["sigma_map.mlp.0.weight"].shape[0]),
      "n_blocks": len(blocks),
  }
