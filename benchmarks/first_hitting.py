"""First-hitting sampler against analytic steps: sequences/s of the full reverse process.

  python benchmarks/first_hitting.py                       # H200: SEDD-small, N 256, L 512
  python benchmarks/first_hitting.py --steps 1024 --no-first-hitting   # one row only
  python benchmarks/first_hitting.py --tiny --batch 4 --length 16 --steps 4   # CPU smoke run

The model is benchmarks/sampling.py's (SEDD-small shape, random weights, bf16, the 20 standard
amino acids allowed). Each configuration is compiled ahead of time (`jit(...).lower().compile()`,
so no warm-up run is spent), then timed on `--repeats` fresh keys (median). One JSON line per
measurement (prefix `JSON `), printed as soon as it is measured:
  {"predictor": "analytic", "steps": 128, ...} and {"predictor": "first_hitting", ...}
with seconds, seq/s, tokens/s, model calls and compile seconds.

first_hitting calls the model once per revealed token: for unconditional samples of one length
that is exactly L calls (512 here), whatever the weights; with --lengths or conditioning it is
the largest number of generated positions in the batch, so it depends on the sample path there,
not here. Analytic calls it steps + 1 times. The seq/s ratio is therefore close to
(steps + 1) / L: first-hitting pays off against analytic with more steps than tokens, and is
exact (no time-discretisation error) where analytic is not.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from sampling import add_model_args  # noqa: E402  (benchmarks/ is on sys.path)
from sampling import build_model  # noqa: E402

logger = logging.getLogger("benchmarks.first_hitting")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, nargs="*", default=[128, 256, 1024],
                 help="analytic step counts (none: first_hitting only)")
  p.add_argument("--no-first-hitting", action="store_true")
  p.add_argument("--draw", default="unbiased", choices=("unbiased", "reference"))
  p.add_argument("--remask", type=float, default=0.0,
                 help="first_hitting's remasking probability (0: off; up to 2 L model calls)")
  p.add_argument("--repeats", type=int, default=1)
  add_model_args(p)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

  import jax
  import numpy as np
  from flax import nnx

  from sedd_jax.sampling import sampler

  cfg, graph, noise, model, allowed = build_model(args)
  model.eval()
  graphdef, state = nnx.split(model)
  shape = (args.batch, args.length)
  device = jax.devices()[0].device_kind
  configs = [("analytic", s) for s in args.steps]
  if not args.no_first_hitting:
    configs.append(("first_hitting", None))
  for predictor, steps in configs:
    def run(state, key, predictor=predictor, steps=steps):
      return sampler.sample_model(nnx.merge(graphdef, state), key, graph, noise, shape,
                                  steps=steps or 1, predictor=predictor, allowed=allowed,
                                  draw=args.draw, return_nfe=True,
                                  remask=args.remask if predictor == "first_hitting" else 0.0)

    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(state, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    times, calls = [], []
    for r in range(args.repeats):
      t0 = time.perf_counter()
      x, nfe = jax.block_until_ready(compiled(state, jax.random.key(r + 1)))
      times.append(time.perf_counter() - t0)
      calls.append(int(nfe))
    x = np.asarray(x)
    if not ((x >= 4) & (x < 24)).all():
      raise RuntimeError("the sampler emitted a non-residue token")
    sec = statistics.median(times)
    row = {"benchmark": "first_hitting", "device": device, "predictor": predictor,
           "steps": steps, "draw": args.draw, "batch": args.batch, "length": args.length,
           "remask": args.remask if predictor == "first_hitting" else 0.0,
           "seconds": sec, "seq_per_s": args.batch / sec,
           "tokens_per_s": args.batch * args.length / sec,
           "model_calls": statistics.median(calls), "compile_s": compile_s,
           "dtype": args.dtype, "model": "tiny" if args.tiny else "sedd-small",
           "jax": jax.__version__}
    sys.stdout.write("JSON " + json.dumps(row) + "\n")
    sys.stdout.flush()
  return 0


if __name__ == "__main__":
  sys.exit(main())
