"""Upper bounds of speed options that are not built: the isolated step with parts of the FP8 work
taken out, beside benchmarks/step_options.py's variants, in one process.

`model.matmul=fp8` (`sedd_jax/model/fp8.py`) scales each quantized tensor by its own amax
(current scaling): a reduction over the tensor before each cast. FP8 with delayed scaling takes
the scales from earlier steps' amax, so the cast needs no reduction first (the amax of this step
is still taken, but beside the cast, in the same pass where XLA fuses them). Its speed is at
most that of FP8 whose scales are constants, which is what this script measures:

* `static` (with `fp8`): every cast divides by a fixed power of two s (1 for activations and
  weights, 2^-20 for gradients) and no amax is taken. The numbers are wrong (the loss it prints
  means nothing); the kernels are those of delayed scaling minus its amax reductions and its
  scale bookkeeping. So `loop+fp8+static` bounds what delayed scaling could gain.
* `block16` / `block32` (with `gateblocked`): `gate_grad.BLOCK`, the first stage of the blocked
  gate-gradient sum (`sedd_jax/model/gate_grad.py`).

Every other token, the flags and the rows are step_options.py's (`TOKENS`; one `JSON ` line
per row, then a table).

  python benchmarks/step_bounds.py --case 1024x64 --variants loop,loop+fp8,loop+fp8+static
  python benchmarks/step_bounds.py --variants loop+gateblocked+block16,loop+gateblocked
"""

from __future__ import annotations

import jax.numpy as jnp

import step_options  # noqa: E402  (benchmarks/step_options.py, beside this script)

from sedd_jax.model import fp8 as fp8_lib  # noqa: E402
from sedd_jax.model import gate_grad  # noqa: E402

# Fixed scales of `static`: s with q = x / s; gradients of a mean loss are far below 1.
STATIC_SCALES = {jnp.float8_e4m3fn: 1.0, jnp.float8_e5m2: 2.0**-20}


def _static_quantize(x, f8):
  """`fp8._quantize` without the amax: x / s as `f8` for a constant power of two s."""
  s = STATIC_SCALES[f8]
  return (x.astype(jnp.float32) * jnp.float32(1 / s)).astype(f8), jnp.float32(s)


PSEUDO = {"static", "block16", "block32"}


def split_variant(variant: str) -> tuple[str, set[str]]:
  """'loop+fp8+static' -> ('loop+fp8', {'static'}); `static` needs `fp8`, `blockN` needs
  `gateblocked`."""
  tokens = variant.split("+")
  pseudo = {t for t in tokens if t in PSEUDO}
  rest = "+".join(t for t in tokens if t not in PSEUDO)
  model, _ = step_options.parse_variant(rest)
  if "static" in pseudo and model.get("matmul") != "fp8":
    raise ValueError(f"variant {variant!r}: 'static' needs 'fp8'")
  if pseudo & {"block16", "block32"} and model.get("gate_grad") != "blocked":
    raise ValueError(f"variant {variant!r}: 'block16' / 'block32' need 'gateblocked'")
  if len(pseudo & {"block16", "block32"}) > 1:
    raise ValueError(f"variant {variant!r}: one block size")
  return rest, pseudo


def run(config: str, length: int, batch: int, variant: str, attention: str, dropout: float,
        steps: int, repeats: int) -> dict:
  """`step_options.run` with the variant's pseudo-tokens patched in for its trace only."""
  rest, pseudo = split_variant(variant)
  quantize, block = fp8_lib._quantize, gate_grad.BLOCK  # pylint: disable=protected-access
  try:
    if "static" in pseudo:
      fp8_lib._quantize = _static_quantize  # pylint: disable=protected-access
    for b in (16, 32):
      if f"block{b}" in pseudo:
        gate_grad.BLOCK = b
    row = step_options.run(config, length, batch, rest, attention, dropout, steps, repeats)
  finally:
    fp8_lib._quantize, gate_grad.BLOCK = quantize, block  # pylint: disable=protected-access
  row.update(bench="step_bounds", variant=variant)
  return row


if __name__ == "__main__":
  step_options.main(default_variants="loop,loop+fp8,loop+fp8+static", check=split_variant,
                    run_one=run, bench="step_bounds", doc=__doc__)
