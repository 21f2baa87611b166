"""Sequence packing (data.pad_to=pack): attention layouts, train step, real loop, noise level.

  python benchmarks/packing.py                      # every part, one H200, < 4 minutes
  python benchmarks/packing.py --parts variance     # the CPU part (loss-estimator variance)

One JSON line per measurement (prefix `JSON `), each with `part`:

* `attention`: cuDNN fwd+bwd ms at L 1024, B 64, 12 heads, head 64, bf16, ~4 sequences per
  row: `lengths` only (today's unpacked rows), `packed` (cuDNN's ragged layout, segment offsets)
  and `mask` (block-diagonal mask = a (B, 1, L, L) bias). `attention.CUDNN_SEGMENT_LAYOUT`
  should name the faster of the two.
* `step`: the isolated train step of configs/uniref50.py:small (`--variant`) on random
  tokens: today's unpacked inputs against packed inputs (segment ids, positions) with each
  cuDNN layout.
* `noise_cost`: what one t per SEQUENCE would add to the step: per-token adaLN (the modulation
  Linear C -> 6H of every block and C -> 2H of the output layer on (B, L, C) instead of (B, C)),
  fwd+bwd ms and the bytes of its (B, L, 6H) outputs kept for the backward pass.
* `loop`: `python -m sedd_jax.train --config=configs/uniref50.py:small` on the bundled data for
  `--loop-steps` steps with data.pad_to = full, bucket, pack: residues/s (the loop's
  real_tokens_per_s: tokens/s x (1 - padding)), median of the logged windows after the first.
* `variance`: CPU, exact score of a small data distribution (no training): the variance of the
  batch loss (mean over sequences) with one t per row shared by the row's m sequences against
  one t per sequence, at equal residues per batch (docs/packing.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))
from sedd_jax.training import metrics as metrics_lib  # noqa: E402

log = logging.getLogger("bench_packing")
PARTS = ("attention", "step", "noise_cost", "loop", "variance")


def emit(rec: dict) -> None:
  print("JSON " + json.dumps(rec), flush=True)


def _segments(batch: int, length: int, per_row: int, seed: int = 0):
  """(B, L) segment ids and positions: `per_row` sequences of random lengths filling ~98%."""
  import numpy as np

  rng = np.random.default_rng(seed)
  seg = np.zeros((batch, length), np.int32)
  pos = np.zeros((batch, length), np.int32)
  for b in range(batch):
    cuts = np.sort(rng.choice(np.arange(16, int(0.98 * length) - 16), per_row - 1, replace=False))
    bounds = np.concatenate([[0], cuts, [int(0.98 * length)]])
    for s, (a, e) in enumerate(zip(bounds[:-1], bounds[1:]), 1):
      seg[b, a:e], pos[b, a:e] = s, np.arange(e - a)
  return seg, pos


def _time(fn, *args, iters: int) -> float:
  """Median ms of `iters` calls after one warm-up call (compile)."""
  import jax

  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def part_attention(args) -> None:
  import jax
  import jax.numpy as jnp

  from sedd_jax.model import attention

  b, l, h, d = 64, 1024, 12, 64
  if not attention.cudnn_available(jnp.bfloat16, d):
    emit({"part": "attention", "status": "n/a: cuDNN flash attention does not run here"})
    return
  seg, _ = _segments(b, l, 4)
  seg = jnp.asarray(seg)
  lengths = (seg > 0).sum(1).astype(jnp.int32)
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v, w = (jax.random.normal(kk, (b, l, h, d), jnp.float32).astype(jnp.bfloat16)
                for kk in ks)
  for name, layout, segs in (("lengths", None, None), ("packed", "packed", seg),
                             ("mask", "mask", seg)):
    def loss(q, k, v, layout=layout, segs=segs):
      o = attention.cudnn_attention(q, k, v, lengths, segs, layout=layout)
      return jnp.sum(o.astype(jnp.float32) * w.astype(jnp.float32))

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    try:
      ms = _time(fn, q, k, v, iters=args.iters)
      emit({"part": "attention", "variant": name, "L": l, "B": b, "heads": h, "head_dim": d,
            "segments_per_row": 4 if segs is not None else 1, "fwd_bwd_ms": round(ms, 3),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__})
    except Exception as e:  # noqa: BLE001 -- report and go on (e.g. layout unsupported)
      emit({"part": "attention", "variant": name, "error": str(e)[:300]})


def part_step(args) -> None:
  import jax
  import numpy as np

  import uniref50
  from sedd_jax.model import attention
  from sedd_jax.training import step as step_lib

  base = uniref50.get_config(args.variant)
  b, l = base.training.batch_size, base.model.length
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 29, (b, l), dtype=np.int32)
  seg, pos = _segments(b, l, 4)
  for name, layout in (("unpacked", None), ("packed", "packed"), ("mask", "mask")):
    cfg = uniref50.get_config(args.variant)
    cfg.data.pad_to = "full" if layout is None else "pack"
    if layout is not None:
      attention.CUDNN_SEGMENT_LAYOUT = layout
    s = step_lib.setup(cfg)
    step = s.train_step()
    batch = {"tokens": tokens, "lengths": np.full((b,), l, np.int32)}
    if layout is not None:
      batch.update(lengths=(seg > 0).sum(1).astype(np.int32), segment_ids=seg, positions=pos)
    data = s.put_batch(batch)
    state = s.state
    t0 = time.perf_counter()
    state, m = step(state, s.rest, data)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
      state, m = step(state, s.rest, data)
    jax.block_until_ready(m)
    for _ in range(args.iters):
      t0 = time.perf_counter()
      state, m = step(state, s.rest, data)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    emit({"part": "step", "variant": name, "L": l, "B": b, "step_ms": round(ms, 2),
          "tokens_per_s": round(b * l / ms * 1e3), "compile_s": round(compile_s, 1),
          "peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
          "device": jax.devices()[0].device_kind})
    del state, s, step


def part_noise_cost(args) -> None:
  """Per-token adaLN of `small` (one t per sequence) against per-row adaLN (one t per row)."""
  import jax
  import jax.numpy as jnp

  import uniref50

  cfg = uniref50.get_config("small").model
  b, l, c, hid, n = args.noise_batch, 1024, cfg.cond_dim, cfg.hidden_size, cfg.n_blocks
  ks = jax.random.split(jax.random.key(0), 4)
  w_blocks = jax.random.normal(ks[0], (n, c, 6 * hid), jnp.float32) * 0.02
  w_out = jax.random.normal(ks[1], (c, 2 * hid), jnp.float32) * 0.02
  r = jax.random.normal(ks[3], (6 * hid,), jnp.float32)  # stands in for the block's use
  for name, shape in (("row", (b, c)), ("sequence", (b, l, c))):
    cond = jax.random.normal(ks[2], shape, jnp.float32)

    def loss(w_blocks, w_out, cond):
      mods = [jnp.einsum("...c,ch->...h", cond.astype(jnp.bfloat16),
                         w.astype(jnp.bfloat16)) for w in w_blocks]
      out = jnp.einsum("...c,ch->...h", cond, w_out, precision="highest")
      return sum(jnp.sum(m.astype(jnp.float32) * r) for m in mods) + jnp.sum(out)

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    ms = _time(fn, w_blocks, w_out, cond, iters=args.iters)
    kept = n * (b * (l if len(shape) == 3 else 1)) * 6 * hid * 2  # bf16 (.., 6H) per block
    emit({"part": "noise_cost", "t_per": name, "adaln_fwd_bwd_ms": round(ms, 3),
          "adaln_activation_mib": round(kept / 2**20, 1),
          "device": jax.devices()[0].device_kind})


def _loop_runs(args):
  """(pad_to, cuDNN segment layout or None) of the loop part: each pack run once per layout."""
  for pad_to in args.loop_pad_to.split(","):
    for layout in (args.loop_layouts.split(",") if pad_to == "pack" else [None]):
      yield pad_to, layout


def part_loop(args) -> None:
  for pad_to, layout in _loop_runs(args):
    with tempfile.TemporaryDirectory() as work:
      flags = [f"--config=configs/uniref50.py:{args.variant}",
               f"--workdir={work}", f"--config.data.pad_to={pad_to}",
               f"--config.training.steps={args.loop_steps}", "--config.training.log_every=10",
               "--config.training.eval_every=0", "--config.training.sample_every=0",
               f"--config.training.ckpt_every={10 * args.loop_steps}", "--config.wandb.mode=disabled"]
      # the layout is a module constant (not a config key): set it in the job's process
      choose = f"attention.CUDNN_SEGMENT_LAYOUT = {layout!r}; " if layout else ""
      launch = ("import runpy, sys; from sedd_jax.model import attention; " + choose +
                f"sys.argv = ['sedd_jax.train'] + {flags!r}; "
                "runpy.run_module('sedd_jax.train', run_name='__main__')")
      t0 = time.perf_counter()
      proc = subprocess.run([sys.executable, "-c", launch], cwd=ROOT, capture_output=True,
                            text=True)
      wall = time.perf_counter() - t0
      rows = [r for r in metrics_lib.read_metrics(os.path.join(work, metrics_lib.METRICS_FILE))
              if r.get("kind") == "train"]
      if proc.returncode or len(rows) < 2:
        emit({"part": "loop", "pad_to": pad_to, "layout": layout,
              "error": proc.stderr.strip()[-400:]})
        continue
      later = rows[1:]
      real = statistics.median(r["real_tokens_per_s"] for r in later)
      tok = statistics.median(r["tokens_per_s"] for r in later)
      emit({"part": "loop", "pad_to": pad_to, "layout": layout, "steps": args.loop_steps,
            "residues_per_s": round(real), "tokens_per_s": round(tok),
            "padding": round(1 - real / tok, 4), "wall_s": round(wall, 1),
            "peak_gib": max((r["peak_gib"] for r in rows if "peak_gib" in r), default=None)})


def part_variance(args) -> None:
  """Loss-estimator variance, one t per row vs one t per sequence, equal residues per batch."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from sedd_jax import diffusion
  from sedd_jax.sampling import likelihood

  v, n_pos = 4, 6
  seqs = np.array(list(itertools.product(range(v), repeat=n_pos)), np.int32)
  # a structured distribution: a random 2nd-order dependence, so context matters (loss | t
  # grows with t: fewer unmasked neighbours)
  rng = np.random.default_rng(0)
  logits = (2.0 * (seqs[:, 1:] == seqs[:, :-1]).sum(1) + rng.normal(0, 1, len(seqs)))
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  graph, noise = diffusion.Absorbing(v), diffusion.LogLinear(eps=1e-3)
  score = likelihood.exact_absorbing_log_score_fn(graph, seqs, probs)
  rows, m, trials = 8, 3, args.variance_trials  # 8 rows x 3 sequences = 24 sequences a batch

  @jax.jit
  def batch_loss(key, per_sequence_t):
    kd, kt, kx = jax.random.split(key, 3)
    x0 = jnp.asarray(seqs)[jax.random.choice(kd, len(seqs), (rows * m,), p=jnp.asarray(probs))]
    t_row = diffusion.sample_time(kt, rows)
    t = jnp.where(per_sequence_t, diffusion.sample_time(kt, rows * m), jnp.repeat(t_row, m))
    x = diffusion.perturb(kx, graph, noise, x0, t)
    per_seq = diffusion.score_entropy_loss(graph, noise, score(x, noise.total_noise(t)), x,
                                           x0, t)
    return per_seq.mean()

  keys = jax.random.split(jax.random.key(1), trials)
  for per_sequence in (False, True):
    vals = np.asarray(jax.lax.map(lambda k: batch_loss(k, per_sequence), keys))
    emit({"part": "variance", "t_per": "sequence" if per_sequence else "row",
          "sequences_per_row": m, "rows": rows, "trials": trials, "mean": round(float(
              vals.mean()), 4), "variance": round(float(vals.var(ddof=1)), 4),
          "se_of_variance": round(float(vals.var(ddof=1) * np.sqrt(2 / (trials - 1))), 4)})


def main(argv=None) -> None:
  # One persistent compilation cache for this process and the loop's trainers: the loop's
  # full / pack steps then reuse the `step` part's compilations.
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                        os.path.join(tempfile.gettempdir(), "sedd_jax_packing_cache"))
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--variant", default="small", help="configs/uniref50.py variant (step, loop)")
  p.add_argument("--loop-steps", type=int, default=80)
  p.add_argument("--loop-pad-to", default="full,bucket,pack", help="data.pad_to values of the loop part")
  p.add_argument("--loop-layouts", default="packed,mask",
                 help="cuDNN segment layouts of the loop part's pack runs")
  p.add_argument("--noise-batch", type=int, default=64, help="B of the noise_cost part")
  p.add_argument("--variance-trials", type=int, default=4000)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  for part in args.parts.split(","):
    if part not in PARTS:
      raise SystemExit(f"unknown part {part!r}; choose from {PARTS}")
    t0 = time.perf_counter()
    globals()[f"part_{part}"](args)
    log.info("part %s: %.1f s", part, time.perf_counter() - t0)


if __name__ == "__main__":
  main()
