"""Where the training step's GPU time goes: a jax.profiler trace, summed by kernel class.

Traces `--steps` steps of the SEDD-small training step (as benchmarks/train_step.py builds it),
then reads the Perfetto trace JSON and sums device-kernel time into classes: matmul (cuBLAS /
cutlass / nvjet GEMMs), attention (cuDNN fused attention), elementwise/reduction fusions
(XLA-generated kernels), copies/transposes, and other. Prints per-class totals per step and the
top kernels, plus one JSON line.

  python benchmarks/profile_step.py --case 1024x64 --attention cudnn
  python benchmarks/profile_step.py --model norm_impl=pallas --model dropout_rng=hash
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, "configs")
import uniref50  # noqa: E402

from sedd_jax.training import step as step_lib  # noqa: E402

CLASSES = (
  ("attention", re.compile(r"cudnn|fmha|flash|sdpa|attn", re.I)),
  ("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|matmul|dot", re.I)),
  ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
  ("reduction fusion", re.compile(r"reduce|reduction", re.I)),
  ("elementwise fusion", re.compile(r"fusion|loop_|input_|triton", re.I)),
)


def classify(name: str) -> str:
  for cls, pattern in CLASSES:
    if pattern.search(name):
      return cls
  return "other"


def device_events(trace: dict):
  """(name, duration us, args) of complete events on GPU processes of a Chrome trace."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  gpu_pids = {e["pid"] for e in events
              if e.get("ph") == "M" and e.get("name") == "process_name"
              and re.search(r"GPU|device:", str(e.get("args", {}).get("name", "")))
              and "CPU" not in str(e.get("args", {}).get("name", ""))}
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e:
      yield e.get("name", "?"), float(e["dur"]), e.get("args", {})


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--case", default="1024x64")
  p.add_argument("--attention", default="cudnn")
  p.add_argument("--dropout", type=float, default=0.1)
  p.add_argument("--remat", default="none")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--variant", default="small")
  p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                 help="more model keys (repeatable), e.g. norm_impl=pallas (strings)")
  args = p.parse_args(argv)
  bad = [kv for kv in args.model if "=" not in kv]
  if bad:
    p.error(f"--model {bad[0]!r}: expected KEY=VALUE")
  extra = dict(kv.split("=", 1) for kv in args.model)
  length, batch = (int(v) for v in args.case.split("x"))

  cfg = uniref50.get_config(args.variant)
  unknown = sorted(set(extra) - set(cfg.model))
  if unknown:
    p.error(f"--model {unknown[0]}: not a key of model ({sorted(cfg.model)})")
  cfg.model.update(length=length, attention=args.attention, dropout=args.dropout,
                   remat=args.remat, **extra)
  cfg.training.batch_size = batch
  cfg.data.pad_to = "full"  # random tokens, one sequence per row
  s = step_lib.setup(cfg)
  state, rest = s.state, s.rest
  train_step = s.train_step()
  rng = np.random.default_rng(0)
  data = s.put_batch({"tokens": rng.integers(4, 29, (batch, length), dtype=np.int32),
                      "lengths": np.full((batch,), length, np.int32)})
  for _ in range(3):
    state, m = train_step(state, rest, data)
  jax.block_until_ready(m)

  logdir = tempfile.mkdtemp(prefix="sedd_profile_")
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(args.steps):
      state, m = train_step(state, rest, data)
    jax.block_until_ready(m)
  files = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise SystemExit(f"no trace JSON under {logdir}")
  with gzip.open(files[0], "rt") as f:
    trace = json.load(f)

  by_class = collections.Counter()
  by_kernel = collections.Counter()
  hlo_of = {}
  for name, dur, ev_args in device_events(trace):
    by_class[classify(name)] += dur
    by_kernel[name] += dur
    hlo_of.setdefault(name, ev_args.get("hlo_op", ev_args.get("long_name", "")))
  total = sum(by_class.values())
  if not total:
    names = [e.get("args", {}).get("name") for e in trace.get("traceEvents", [])
             if e.get("ph") == "M" and e.get("name") == "process_name"]
    print(f"no device events found; trace processes: {names}")
  steps = args.steps
  print(f"device kernel time per step: {total / steps / 1e3:.2f} ms "
        f"({args.case}, {args.attention}, dropout {args.dropout}, remat {args.remat}"
        f"{''.join(f', {k} {v}' for k, v in extra.items())})")
  for cls, us in by_class.most_common():
    print(f"  {cls:<20} {us / steps / 1e3:9.2f} ms  {100 * us / max(total, 1):5.1f}%")
  print(f"top {args.top} kernels (ms per step):")
  for name, us in by_kernel.most_common(args.top):
    print(f"  {us / steps / 1e3:8.3f}  {classify(name):<18} {name[:90]}  {str(hlo_of[name])[:60]}")
  print("JSON " + json.dumps({"bench": "profile_step", "case": args.case,
                              "attention": args.attention, "dropout": args.dropout,
                              "model": extra, "ms_per_step": {k: round(v / steps / 1e3, 3)
                                              for k, v in by_class.items()},
                              "total_ms": round(total / steps / 1e3, 3)}))


if __name__ == "__main__":
  main()
