"""Several GPUs of one host: the real training loop (`python -m sedd_jax.train`) in fresh processes.

  python benchmarks/multi_gpu.py                      # all three parts, ~7 minutes on 2 H200s
  python benchmarks/multi_gpu.py --only restore       # scaling | processes | restore | big
  python benchmarks/multi_gpu.py --only scaling --variant medium --cases 2gpu_dp,2gpu_fsdp \
      --base-tokens-per-s 123456 --set model.scan_blocks=true
  python benchmarks/multi_gpu.py --cpu --variant tiny --steps 20 --batch-per-gpu 8   # dry run

* scaling: `small` on the bundled data, `--steps` steps, batch 64 per GPU: 1 GPU; 2 GPUs of one
  process, data parallel and FSDP (`training.fsdp`). FSDP on one GPU is data parallelism (nothing
  to shard over), so the 1-GPU run is the baseline of both.
* processes: the same two 2-GPU runs as 2 processes x 1 GPU (the cluster layout:
  `jax.distributed` on 127.0.0.1, `CUDA_VISIBLE_DEVICES` one GPU per process).
* big (not in the default parts): a ~1.3B-parameter shape (`--big-shape` on `medium`) with FSDP
  on 2 GPUs for `--big-steps` steps, then data parallelism at the same batch: peak memory per GPU
  (`peak_gib`, the trainer's train rows) and the first and last loss.
* restore: `tiny`, 40 steps on 1 GPU and on 2 GPUs with a checkpoint at step 20; each run's
  step-20 checkpoint resumed on the OTHER topology to step 40. The losses of steps 21..40 are
  compared with the uninterrupted run on the resuming topology and on the saving one (the batch
  stream and the loss do not depend on the topology).

Runs share a JAX compilation cache (`--root`/jax_cache), so `first_step_s` of a later run may
be a cache load. tokens/s: the median over the logged windows after the first of `tokens_per_s`
in the run's metrics.jsonl (padded tokens of the global batch per second of the loop, data loading
included); per GPU and efficiency = (tokens/s per GPU) / (1-GPU tokens/s).

One JSON line per measurement on stdout; each run's log and workdir under `--root`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sedd_jax.training import metrics as metrics_lib  # noqa: E402

QUIET = {"training.eval_every": 0, "training.sample_every": 0, "wandb.mode": "disabled"}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def visible_gpus() -> list[str]:
  given = os.environ.get("CUDA_VISIBLE_DEVICES")
  return given.split(",") if given else [str(i) for i in range(8)]


def train(name: str, root: pathlib.Path, variant: str, gpus: int, processes: int,
          overrides: dict, timeout_s: float, workdir: pathlib.Path | None = None,
          cpu: bool = False) -> dict:
  """Runs one job on `gpus` GPUs split over `processes` processes (with `cpu`, simulated CPU
  devices instead); returns its wall time, first-step time, workdir and process 0's log."""
  workdir = workdir or root / name
  ids = visible_gpus()[:gpus]
  per = gpus // processes
  args = [sys.executable, "-m", "sedd_jax.train", f"--config=configs/uniref50.py:{variant}",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  port = free_port()
  procs, logs = [], []
  t0 = time.perf_counter()
  for p in range(processes):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(ids[p * per:(p + 1) * per]),
               JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),  # later runs skip compiling
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if cpu:
      env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={per}")
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(p))
    logs.append(root / f"{name}.p{p}.log")
    with open(logs[-1], "w") as f:
      procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
  failed = None
  while any(p.poll() is None for p in procs) and failed is None:
    if any(p.poll() not in (None, 0) for p in procs):
      failed = "a process failed"
    elif time.perf_counter() - t0 > timeout_s:
      failed = f"timed out after {timeout_s:.0f} s"
    time.sleep(0.5)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  if failed or any(p.returncode for p in procs):
    tail = logs[0].read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{name}: {failed or 'a process failed'}; see {logs}\n{tail}")
  text = logs[0].read_text(errors="replace")
  first = [float(line.split("first step done in ")[1].split(" s")[0])
           for line in text.splitlines() if "first step done in" in line]
  return {"wall_s": round(time.perf_counter() - t0, 1),
          "first_step_s": first[-1] if first else None, "workdir": workdir, "log": text}


def train_rows(workdir: pathlib.Path) -> list[dict]:
  return [r for r in metrics_lib.read_metrics(workdir / metrics_lib.METRICS_FILE)
          if r.get("kind") == "train"]


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


CASES = {"1gpu": (1, 1, False), "2gpu_dp": (2, 1, False), "2gpu_fsdp": (2, 1, True),
         "2proc_dp": (2, 2, False), "2proc_fsdp": (2, 2, True)}
# The config keys each case sets itself (not for --set).
CASE_KEYS = ("training.steps", "training.batch_size", "training.log_every", "training.fsdp",
             "training.ckpt_every")


def run_case(args, root: pathlib.Path, variant: str, case: str, batch_per_gpu: int, steps: int,
             extra: dict) -> dict:
  """One real-loop job of CASES[case]: the median tokens/s and residues/s of the logged windows
  after the first, and the highest device-memory peak process 0 logged."""
  gpus, procs, fsdp = CASES[case]
  own = dict(zip(CASE_KEYS, (steps, batch_per_gpu * gpus, args.log_every, fsdp, 10 * steps)))
  over = dict(QUIET, **own, **extra)
  r = train(f"{variant}_{case}", root, variant, gpus, procs, over, args.timeout, cpu=args.cpu)
  rows = train_rows(r["workdir"])
  later = rows[1:] or rows
  tps = statistics.median(row["tokens_per_s"] for row in later)
  rps = statistics.median(row["real_tokens_per_s"] for row in later)
  peaks = [row["peak_gib"] for row in rows if "peak_gib" in row]
  params = [line.split("model: ")[1].split(" parameters")[0] for line in r["log"].splitlines()
            if "model: " in line and " parameters" in line]
  return {"variant": variant, "case": case, "gpus": gpus, "processes": procs, "fsdp": fsdp,
          "batch": batch_per_gpu * gpus, "steps": steps, "parameters": params[0] if params else None,
          "tokens_per_s": round(tps), "tokens_per_s_per_gpu": round(tps / gpus),
          "residues_per_s": round(rps), "residues_per_s_per_gpu": round(rps / gpus),
          "peak_gib": round(max(peaks), 2) if peaks else None,
          "loss_first_last": [rows[0]["loss"], rows[-1]["loss"]] if rows else None,
          "windows": len(later), "first_step_s": r["first_step_s"], "wall_s": r["wall_s"]}


def throughput(args, root: pathlib.Path, parts: set[str]) -> None:
  """Scaling and processes: efficiency = (tokens/s per GPU) / (1-GPU tokens/s), the 1-GPU run
  of this invocation or `--base-tokens-per-s`."""
  if args.cases:
    cases = args.cases.split(",")
  else:
    cases = ["1gpu"]
    if "scaling" in parts:
      cases += ["2gpu_dp", "2gpu_fsdp"]
    if "processes" in parts:
      cases += ["2proc_dp", "2proc_fsdp"]
  base = args.base_tokens_per_s
  for case in cases:
    rec = run_case(args, root, args.variant, case, args.batch_per_gpu, args.steps, args.extra)
    base = base or rec["tokens_per_s"]
    emit({"bench": "multi_gpu", "part": "scaling" if rec["processes"] == 1 else "processes",
          **rec, "efficiency_vs_1gpu": round(rec["tokens_per_s_per_gpu"] / base, 3)})


def big(args, root: pathlib.Path) -> None:
  """A ~1.3B-parameter shape (`--big-shape`, on the `medium` config): FSDP on 2 GPUs trained for
  `--big-steps` steps, then data parallelism on 2 GPUs at the same batch for a few steps (or its
  failure, e.g. out of memory): the memory per GPU of each (`--cases` picks others, e.g. 1gpu)."""
  hidden, blocks, heads = (int(x) for x in args.big_shape.split("x"))
  extra = dict(args.extra, **{"model.hidden_size": hidden, "model.n_blocks": blocks,
                              "model.n_heads": heads})
  cases = args.cases.split(",") if args.cases else ["2gpu_fsdp", "2gpu_dp"]
  for case in cases:
    steps = args.big_steps if CASES[case][2] else 3 * args.log_every
    try:
      rec = run_case(args, root, "medium", case, args.big_batch_per_gpu, steps, extra)
    except RuntimeError as e:
      rec = {"variant": "medium", "case": case, "error": str(e)[-600:]}
    emit({"bench": "multi_gpu", "part": "big", "shape": args.big_shape, **rec})


def restore(args, root: pathlib.Path) -> None:
  """Save on one topology, resume on the other, compare with the uninterrupted runs."""
  over = dict(QUIET, **{"training.steps": 40, "training.ckpt_every": 20, "training.log_every": 1})
  full = {}
  for gpus in (1, 2):
    r = train(f"tiny_{gpus}gpu", root, "tiny", gpus, 1, over, args.timeout, cpu=args.cpu)
    full[gpus] = {row["step"]: row["loss"] for row in train_rows(r["workdir"])}
  for saved, resumed in ((2, 1), (1, 2)):
    name = f"tiny_saved{saved}_resumed{resumed}"
    workdir = root / name
    shutil.copytree(root / f"tiny_{saved}gpu", workdir)
    shutil.rmtree(workdir / "checkpoints" / "40")
    n_before = len(train_rows(workdir))
    r = train(name, root, "tiny", resumed, 1, over, args.timeout, workdir=workdir, cpu=args.cpu)
    after = {row["step"]: row["loss"] for row in train_rows(workdir)[n_before:]}

    def max_rel(ref):
      return max(abs(after[s] - ref[s]) / abs(ref[s]) for s in after)

    emit({"bench": "multi_gpu", "part": "restore", "variant": "tiny", "saved_on_gpus": saved,
          "resumed_on_gpus": resumed, "saved_step": 20,
          "resumed_from_step_20": "resumed from" in r["log"] and "(step 20)" in r["log"],
          "resumed_steps": [min(after), max(after)],
          "loss_before": [full[saved][s] for s in (18, 19, 20)],
          "loss_after": [after[s] for s in (21, 22, 23)],
          "uninterrupted_after": [full[resumed][s] for s in (21, 22, 23)],
          "max_rel_diff_vs_uninterrupted_same_gpus": max_rel(full[resumed]),
          "max_rel_diff_vs_uninterrupted_saving_gpus": max_rel(full[saved]),
          "wall_s": r["wall_s"]})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", action="append",
                      choices=("scaling", "processes", "restore", "big"),
                      help="parts to run (repeatable; default all)")
  parser.add_argument("--variant", default="small", help="config of scaling / processes")
  parser.add_argument("--steps", type=int, default=80)
  parser.add_argument("--log-every", type=int, default=10)
  parser.add_argument("--batch-per-gpu", type=int, default=64)
  parser.add_argument("--timeout", type=float, default=300, help="seconds per training job")
  parser.add_argument("--root", default="/tmp/sedd_multi_gpu", help="logs and workdirs")
  parser.add_argument("--cpu", action="store_true", help="simulated CPU devices (a dry run)")
  parser.add_argument("--cases", default="",
                      help=f"comma-separated cases of scaling/processes or big, of {list(CASES)}")
  parser.add_argument("--base-tokens-per-s", type=float, default=0.0,
                      help="1-GPU tokens/s for the efficiency when --cases has no 1gpu")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override of the scaling, processes and big runs, e.g. "
                      "model.scan_blocks=true")
  parser.add_argument("--big-shape", default="2048x25x16", help="hidden x blocks x heads")
  parser.add_argument("--big-batch-per-gpu", type=int, default=16)
  parser.add_argument("--big-steps", type=int, default=30)
  args = parser.parse_args()
  unknown = [c for c in args.cases.split(",") if c and c not in CASES]
  if unknown:
    parser.error(f"--cases {','.join(unknown)}: choose from {list(CASES)}")
  if any("=" not in kv for kv in args.set):
    parser.error(f"--set takes KEY=VALUE; got {[kv for kv in args.set if '=' not in kv]}")
  args.extra = dict(kv.split("=", 1) for kv in args.set)
  own = [k for k in args.extra if k in CASE_KEYS]
  if own:
    parser.error(f"--set {own[0]}: each case sets it (use --steps, --batch-per-gpu, "
                 "--log-every or --cases)")
  parts = set(args.only or ("scaling", "processes", "restore"))
  root = pathlib.Path(args.root)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  if parts & {"scaling", "processes"}:
    throughput(args, root, parts)
  if "restore" in parts:
    restore(args, root)
  if "big" in parts:
    big(args, root)


if __name__ == "__main__":
  main()
