"""The isolated training step under the speed options of issue 17, side by side, in one process.

SEDD-small (configs/uniref50.py:small), dropout 0.1, EMA, AdamW, clip, bf16 compute, random
tokens at full length, as benchmarks/train_step.py. Each variant is '+'-joined option tokens
(`TOKENS`): `loop` = today's Python loop over the blocks (model.scan_blocks=False), `scan` =
the blocks as one lax.scan, `threefry` / `rbg` / `hash` = model.dropout_rng (`hash` the
default), `bf16res` / `f32res` = model.residual_dtype=bfloat16 / float32 (the config's `auto`
is bfloat16 under bf16 compute on GPUs), `fp8` = model.matmul=fp8, `remat_mlp` =
model.remat=mlp, `normref` / `normxla` / `normpallas` = model.norm_impl=reference / xla / pallas
(LayerNorm + modulate; the config's `auto` is `pallas` on Ampere-or-later GPUs, so `loop` has
the Pallas norm there); `geluref` / `gelusaved` = model.gelu_impl=reference / saved_input (the
default: the GELU keeps only its input for the backward pass); `gatexla` / `gateblocked` =
model.gate_grad (the gate gradients of the residual adds: `blocked` the default, a two-stage
sum without XLA's (B, L, H) -> (B, H, L) transposes, `xla` autodiff; `benchmarks/gate_grad.py`
times one gate alone). So `loop` is the default step, `loop+f32res+gatexla` the default before
the ninth session and `loop+threefry+normref+geluref+f32res+gatexla` the default before issue
17's options;
`nounroll` = XLA's GPU while-loop unrolling off, `cublaslt` = XLA's cuBLASLt GEMMs (bias + GELU
epilogues), `noautotune` = no XLA autotuning (`COMPILER_TOKENS`).

For every case and variant: compile time of the step (trace + lower, and in all with XLA's
compilation; nothing cached), XLA's memory estimate of the compiled step (arguments +
temporaries + outputs - aliased), the device's peak memory so far (monotone within the
process: the largest variant's), and the median over `--repeats` of `--steps` steps ->
tokens/s. One JSON line per measurement (prefix `JSON `), a table last.

  python benchmarks/step_options.py                      # GPU defaults: both cases, all variants
  python benchmarks/step_options.py --case 128x2 --variants loop,scan --steps 1 --repeats 1
  python benchmarks/step_options.py --variant-set compile --case 128x2 --configs tiny,small
  python benchmarks/step_options.py --case 1024x64 --variants loop,loop+normxla,loop+normpallas
  python benchmarks/step_options.py --case 1024x64 --variants loop,loop+gateblocked
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, "configs")
import train_step  # noqa: E402  (benchmarks/train_step.py, beside this script)
import uniref50  # noqa: E402

from sedd_jax.training import step as step_lib  # noqa: E402

log = logging.getLogger("step_options")

TOKENS = {
  "loop": {"scan_blocks": False},
  "scan": {"scan_blocks": True},
  "threefry": {"dropout_rng": "threefry"},
  "rbg": {"dropout_rng": "rbg"},
  "hash": {"dropout_rng": "hash"},
  "bf16res": {"residual_dtype": "bfloat16"},
  "f32res": {"residual_dtype": "float32"},
  "fp8": {"matmul": "fp8"},
  "remat_mlp": {"remat": "mlp"},
  "geluref": {"gelu_impl": "reference"},
  "gelusaved": {"gelu_impl": "saved_input"},
  "normref": {"norm_impl": "reference"},
  "normxla": {"norm_impl": "xla"},
  "normpallas": {"norm_impl": "pallas"},
  "gatexla": {"gate_grad": "xla"},
  "gateblocked": {"gate_grad": "blocked"},
}
# Tokens that set XLA options of the compiled step instead of model keys.
COMPILER_TOKENS = {
  # does XLA's GPU while-loop unroller undo the scan's compile-time gain?
  "nounroll": {"xla_gpu_enable_while_loop_unrolling": "WHILE_LOOP_UNROLLING_NO_UNROLL"},
  # cuBLASLt GEMMs, whose epilogues can take the MLP's bias + GELU (the profile's 11.7 ms GELU)
  "cublaslt": {"xla_gpu_enable_cublaslt": True},
  # no GEMM/fusion autotuning: how much of the ~30 s compile is autotuning, at what step cost
  "noautotune": {"xla_gpu_autotune_level": 0},
}
# Most telling first: rows print as they finish, so a run cut short keeps these.
GPU_VARIANTS = ("loop", "loop+threefry+normref+geluref+f32res+gatexla", "loop+remat_mlp",
                "loop+fp8", "scan")


def parse_variant(variant: str) -> tuple[dict, dict]:
  """'scan+hash' -> ({'scan_blocks': True, 'dropout_rng': 'hash'}, {}): (model keys, XLA
  options); unknown tokens fail."""
  model, compiler = {}, {}
  for token in variant.split("+"):
    if token in TOKENS:
      model.update(TOKENS[token])
    elif token in COMPILER_TOKENS:
      compiler.update(COMPILER_TOKENS[token])
    else:
      raise ValueError(f"variant {variant!r}: unknown option {token!r}; choose from "
                       f"{tuple(TOKENS) + tuple(COMPILER_TOKENS)}")
  return model, compiler


def memory_estimate_gib(compiled) -> float:
  """XLA's estimate of the compiled step's device memory: arguments + temporaries + outputs -
  aliased (donated) bytes."""
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  total = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2**30


def run(config: str, length: int, batch: int, variant: str, attention: str, dropout: float,
        steps: int, repeats: int) -> dict:
  """Compiles and times one variant; returns its JSON row."""
  model, compiler = parse_variant(variant)
  cfg = uniref50.get_config(config)
  cfg.model.update(length=length, attention=attention, dropout=dropout, dtype="bfloat16", **model)
  cfg.training.batch_size = batch
  cfg.data.pad_to = "full"  # random tokens, one sequence per row
  s = step_lib.setup(cfg)
  state = s.state
  rng = np.random.default_rng(0)
  data = s.put_batch({"tokens": rng.integers(4, 29, (batch, length), dtype=np.int32),
                      "lengths": np.full((batch,), length, np.int32)})
  t0 = time.perf_counter()
  lowered = s.train_step(compiler or None).lower(state, s.rest, data)
  lower_s = time.perf_counter() - t0
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  row = {"bench": "step_options", "device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "date": time.strftime("%Y-%m-%d"), "config": config, "L": length, "B": batch,
         "variant": variant, "attention": attention, "dropout": dropout,
         "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
         "mem_estimate_gib": round(memory_estimate_gib(compiled), 2)}
  if steps > 0:
    state, metrics, times = train_step.time_steps(compiled, state, (s.rest, data), steps, repeats,
                                                  warmup=2)
    step_s = statistics.median(times)
    row.update(step_ms=round(step_s * 1e3, 2), tokens_per_s=round(batch * length / step_s),
               spread_pct=round(100 * (max(times) - min(times)) / step_s, 1),
               peak_gib_so_far=round(train_step.peak_gib(), 2),
               loss=float(metrics["loss"]))
  del state, compiled, data, s
  gc.collect()
  return row


def main(argv=None, *, default_variants: str = ",".join(GPU_VARIANTS), check=parse_variant,
         run_one=run, bench: str = "step_options", doc: str = __doc__) -> None:
  """The command line; benchmarks/step_bounds.py reuses it with its own variant `check` and
  `run_one` (`run`'s signature)."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--case", action="append", default=None, help="LxB (repeatable); default "
                 "1024x64 and 512x128")
  p.add_argument("--variants", default=default_variants, help="comma-separated variants")
  p.add_argument("--configs", default="small", help="comma-separated variants of uniref50.py")
  p.add_argument("--attention", default="cudnn")
  p.add_argument("--dropout", type=float, default=0.1)
  p.add_argument("--steps", type=int, default=5, help="steps per repeat; 0 = compile only")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  variants = args.variants.split(",")
  for v in variants:
    check(v)  # fail before compiling anything
  rows = []
  for config in args.configs.split(","):
    for variant in variants:
      for case in args.case or ["1024x64", "512x128"]:
        length, batch = (int(x) for x in case.split("x"))
        try:
          row = run_one(config, length, batch, variant, args.attention, args.dropout, args.steps,
                        args.repeats)
        except Exception as e:  # noqa: BLE001 -- one failing option must not hide the others
          row = {"bench": bench, "config": config, "L": length, "B": batch,
                 "variant": variant, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print("JSON " + json.dumps(row), flush=True)
  print_table(rows)


def print_table(rows: list[dict]) -> None:
  """The rows of `run` (or their errors) as a table."""
  print(f"{'config':>7} {'L':>5} {'B':>4} {'variant':>28} {'compile s':>9} {'ms/step':>8} "
        f"{'tok/s':>9} {'spread%':>7} {'mem est':>7} {'peak':>6}")
  for r in rows:
    if "error" in r:
      print(f"{r['config']:>7} {r['L']:>5} {r['B']:>4} {r['variant']:>28}  ERROR {r['error'][:70]}")
      continue
    print(f"{r['config']:>7} {r['L']:>5} {r['B']:>4} {r['variant']:>28} {r['compile_s']:>9} "
          f"{r.get('step_ms', '-'):>8} {r.get('tokens_per_s', '-'):>9} "
          f"{r.get('spread_pct', '-'):>7} {r['mem_estimate_gib']:>7} "
          f"{r.get('peak_gib_so_far', '-'):>6}")


if __name__ == "__main__":
  main()
