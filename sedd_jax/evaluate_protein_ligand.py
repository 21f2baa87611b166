"""The protein-ligand half of `python -m sedd_jax.evaluate` (checkpoints with `cfg.task ==
"protein_ligand"`): the score-entropy loss of every training mode on the pairs of `--split`
(see `sedd_jax.evaluate` for the flags and the output).
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys
import time

import numpy as np

from sedd_jax import inference
from sedd_jax.cli import CliError
from sedd_jax.cli import json_safe
from sedd_jax.data import reference

logger = logging.getLogger("sedd_jax.evaluate")


def check_protein_ligand_args(args) -> None:
  """CliError for the flags that do not apply to protein-ligand checkpoints."""
  if args.fasta or args.baseline_fasta:
    raise CliError("--fasta/--baseline-fasta do not apply to protein-ligand checkpoints; use "
                   "--split valid|test")


def read_pairs(store, n: int, p_len: int, l_len: int) -> dict[str, np.ndarray]:
  """The first `n` pairs of `store`, cropped and padded: {tokens (n, p_len), lengths (n,),
  ligand_tokens (n, l_len), ligand_lengths (n,)} int32."""
  prot, plen = reference.pad_tokens(
      [np.asarray(store.get(i, "protein"))[:p_len] for i in range(n)], p_len)
  lig, llen = reference.pad_tokens(
      [np.asarray(store.get(i, "ligand"))[:l_len] for i in range(n)], l_len)
  return {"tokens": prot, "lengths": plen, "ligand_tokens": lig, "ligand_lengths": llen}


def mean_losses(model, cfg, pairs: dict[str, np.ndarray], batch_size: int, num_samples: int,
                seed: int) -> dict[str, float]:
  """{"loss", "loss/<mode>"}: every mode's loss (`modes.eval_loss_fn`, `num_samples` draws of t
  per pair) averaged over the pairs, `batch_size` pairs per compiled call."""
  import jax  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from sedd_jax.protein_ligand import modes  # noqa: PLC0415

  every = ml_collections.ConfigDict(cfg.to_dict())
  every.mode = modes.ALL  # evaluate every mode, whatever the checkpoint was trained on
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, batch, key):
    """Per-mode mean losses of the batch, averaged over num_samples keys."""
    def one(k):
      return modes.eval_loss_fn(nnx.merge(graphdef, state), batch, k, every)
    outs = jax.lax.map(one, jax.random.split(key, num_samples))  # each leaf (num_samples,)
    return jax.tree.map(lambda x: x.mean(axis=0), outs)

  n = len(pairs["lengths"])
  bs = min(batch_size, n)
  sums: dict[str, float] = {}
  t0 = time.perf_counter()
  for b in range(0, n, bs):
    real = min(bs, n - b)
    # full batches share one compiled shape; the last, partial one compiles its own
    batch = {k: v[b:b + real] for k, v in pairs.items()}
    out = jax.device_get(run(state, batch, jax.random.fold_in(jax.random.key(seed), b)))
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(v) * real
    logger.info("%d/%d pairs evaluated (%.1f pairs/s)", b + real, n,
                (b + real) / max(time.perf_counter() - t0, 1e-9))
  return {k: v / n for k, v in sums.items()}


SCORED = {"protein_only": ("protein",), "ligand_only": ("ligand",),
          "ligand_given_protein": ("ligand",), "protein_given_ligand": ("protein",),
          "joint": ("protein", "ligand")}  # the tracks each mode's loss scores


def per_mode(means: dict[str, float], tokens: dict[str, float], n: int) -> dict[str, dict]:
  """{mode: {loss (nats per pair), loss_per_token (per real token of the scored tracks),
  scored_tracks}}; joint's loss is the mean of its two tracks' per-sequence losses."""
  losses = {}
  for mode, tracks in SCORED.items():
    loss = means[f"loss/{mode}"]
    per_tok = loss * n / sum(tokens[t] for t in tracks)
    if mode == "joint":
      per_tok = 2 * loss * n / sum(tokens.values())
    losses[mode] = {"loss": loss, "loss_per_token": per_tok, "scored_tracks": tracks}
  return losses


def run_protein_ligand(args, loaded, out_path: pathlib.Path) -> int:
  """Per-mode losses of the protein-ligand model of the `checkpoint.InferenceCheckpoint`
  `loaded` on the pairs of --split (see the docstring)."""
  model, cfg = loaded.model, loaded.cfg
  check_protein_ligand_args(args)
  store, _ = reference.reference_pairs(cfg, args.split)
  n = len(store) if not args.max_sequences else min(len(store), args.max_sequences)
  p_len, l_len = int(cfg.model.length), int(cfg.ligand.length)
  pairs = read_pairs(store, n, p_len, l_len)
  means = mean_losses(model, cfg, pairs, args.batch_size, args.num_samples, args.seed)
  tokens = {"protein": float(pairs["lengths"].sum()),
            "ligand": float(pairs["ligand_lengths"].sum())}
  losses = per_mode(means, tokens, n)
  result = {
      "source": args.workdir or args.checkpoint, **inference.provenance(loaded),
      "task": "protein_ligand",
      "data": f"{cfg.data.prepared}:{args.split}", "num_pairs": n,
      "num_samples": args.num_samples, "seed": args.seed, "trained_mode": cfg.mode,
      "model_length": p_len, "ligand_length": l_len, "tokens": tokens,
      "loss": means["loss"], **{f"loss/{m}": means[f"loss/{m}"] for m in SCORED},
      "losses": losses,
  }
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))
  msg = "; ".join(f"{m} {losses[m]['loss']:.3f} ({losses[m]['loss_per_token']:.3f}/tok)"
                  for m in SCORED)
  logger.info("%d pairs of %s: %s -> %s", n, args.split, msg, out_path)
  sys.stdout.write(f"per-mode loss (nats/pair, per token): {msg}\n")
  return 0
