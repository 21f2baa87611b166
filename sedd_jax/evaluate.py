"""Likelihood CLI: python -m sedd_jax.evaluate --workdir DIR --split valid --out eval.json

Estimates the model's negative ELBO (an upper bound on the NLL; sedd_jax.sampling.likelihood)
(`SeddModel.score` of the model `sedd_jax.load` gives for `--workdir DIR` (a run folder or an
exported bundle: the same numbers as its run) or `--checkpoint PATH`, with `--weights ema|raw`)
on held-out data, a split of the prepared store (`--split valid|test`, from cfg.data.prepared)
or a FASTA file (`--fasta FILE`), with `--num-samples` Monte-Carlo draws of t per sequence
(stratified by default; `--antithetic` or `--t-sampling iid|stratified|antithetic`). Sequences
longer than the model's length are cropped to their first `cfg.model.length` residues (counted
in the output). Sequences are packed several to a row (`--pad-to pack`, the default; the
sequences of a row share each draw of t, see `sedd_jax.sampling.likelihood.nelbo`), so that a
FASTA of short peptides is not mostly padding; `--pad-to full` gives each sequence its own row
(`--batch-size` rows per compiled call either way). Prints nelbo/token, perplexity, its
standard error, the share of non-standard
residues (X B U Z O) among the evaluated tokens and the unigram baseline (add-one-smoothed
frequencies of the 25 residue letters of the ESM-2 alphabet, the 20 standard amino acids and
X B U Z O, in the training split or `--baseline-fasta`; for a bundle, the training split's
counts in its data_stats.json, so no data store is needed), and writes them with the settings (and
per-sequence values) to `--out` (default `<run folder>/eval_<split or FASTA name>.json`). Beside
the negative ELBO: bits per residue (nats / ln 2) and, for the absorbing graph, the masked
pseudo-perplexity that ESM-2 and other protein masked language models report (`--mask-frac` of the
tokens masked, default 0.15, `--pppl-samples` mask draws per sequence, default 4;
`--no-pseudo-perplexity` skips it; sedd_jax.sampling.likelihood.masked_nll).

Protein-ligand checkpoints (`cfg.task == "protein_ligand"`): the score-entropy loss of every
training mode (`sedd_jax.protein_ligand.modes.eval_loss_fn`, the per-sequence loss averaged over
the pairs of `--split`, `--num-samples` draws of t per pair) in the JSON as `loss/<mode>`, with
their mean as `loss` (per mode: `losses[mode]`, nats per sequence, and per real token of the
track(s) the mode scores; `sedd_jax.evaluate_protein_ligand`). `--fasta` does not apply.

The JSON records the checkpoint used (weights, checkpoint folder, step, run folder: an older
checkpoint when the newest cannot be read) and the seed. Before the model is loaded, the output
is checked (`cli.check_outputs`): it may not be an input (--fasta, --baseline-fasta, --config,
the run's config.json; through symlinks and hard links too), lie inside the run's checkpoints
or the data store, be an existing folder, or be unwritable; missing parent folders are created.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import sys
from typing import Sequence

import numpy as np

from sedd_jax import evaluate_protein_ligand as pl_evaluate
from sedd_jax import inference
from sedd_jax.cli import CliError
from sedd_jax.cli import check_outputs
from sedd_jax.cli import check_seed
from sedd_jax.cli import json_safe
from sedd_jax.cli import run_cli
from sedd_jax.data import reference

logger = logging.getLogger("sedd_jax.evaluate")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m sedd_jax.evaluate",
                              description=__doc__.split("\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training run folder (newest loadable checkpoint) or "
                   "exported bundle (python -m sedd_jax.export)")
  src.add_argument("--checkpoint", help="a checkpoint folder (<workdir>/checkpoints/<step>)")
  p.add_argument("--config", help="expected config (file.py[:variant]); its model shape must "
                 "match the checkpoint's")
  p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                 help="the EMA weights (default) or the raw parameters (a bundle holds the "
                 "weights it was exported with)")
  data = p.add_mutually_exclusive_group(required=True)
  data.add_argument("--split", choices=("valid", "test"))
  data.add_argument("--fasta")
  p.add_argument("--num-samples", type=int, default=16, help="draws of t per sequence")
  p.add_argument("--t-sampling", choices=("iid", "stratified", "antithetic"),
                 default="stratified")
  p.add_argument("--antithetic", action="store_true", help="= --t-sampling antithetic")
  p.add_argument("--t-min", type=float, default=0.0, help="lower end of the t integral")
  p.add_argument("--batch-size", type=int, default=16, help="rows per compiled call")
  p.add_argument("--pad-to", choices=("pack", "full"), default="pack",
                 help="pack several sequences per row (default) or one per row")
  p.add_argument("--max-sequences", type=int, default=None, help="evaluate the first N only")
  p.add_argument("--baseline-fasta", help="training FASTA for the unigram baseline")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="output JSON (default: eval_<split or FASTA name>.json in the "
                 "run folder, the --workdir or the folder holding checkpoints/<step>)")
  p.add_argument("--mask-frac", type=float, default=0.15,
                 help="masked fraction for the pseudo-perplexity (default 0.15, as ESM-2)")
  p.add_argument("--pppl-samples", type=int, default=4,
                 help="mask draws per sequence for the pseudo-perplexity (default 4)")
  p.add_argument("--no-pseudo-perplexity", action="store_true",
                 help="skip the masked pseudo-perplexity")
  return p


def default_out(args) -> pathlib.Path:
  """<run folder>/eval_<split or FASTA stem>[_<step>].json; the run folder of --checkpoint
  DIR/checkpoints/<step> is DIR (the step is then part of the name)."""
  what = args.split or pathlib.Path(args.fasta).name.split(".")[0]
  if args.workdir:
    return pathlib.Path(args.workdir) / f"eval_{what}.json"
  ckpt = pathlib.Path(args.checkpoint)
  run_dir = ckpt.parents[1] if ckpt.parent.name == "checkpoints" else ckpt.parent
  return run_dir / f"eval_{what}_{ckpt.name}.json"


def read_fasta_tokens(path: str, flag: str, limit: int | None = None
                      ) -> tuple[list[str], list[np.ndarray]]:
  """(names, ESM-2 id arrays) of the records of FASTA `path` (the first `limit`); CliError
  naming `flag` and the file (and line) on bad input."""
  from sedd_jax.data import fasta as fasta_lib
  from sedd_jax.data import tokenizers

  if not pathlib.Path(path).is_file():
    raise CliError(f"{flag} {path} does not exist")
  tok = tokenizers.ProteinTokenizer()
  names, seqs = [], []
  try:
    for rec in fasta_lib.read_fasta(path, fasta_lib.Skips(hint="")):
      names.append(rec.name)
      seqs.append(tok.encode(rec.text, source=str(path), line=rec.line, name=rec.name))
      if limit and len(seqs) >= limit:
        break
  except ValueError as e:
    raise CliError(f"{flag}: {e}") from None
  return names, seqs


def residue_shares(seqs: list[np.ndarray]) -> dict:
  """Share of the non-standard residues X B U Z O among the tokens of `seqs` (ESM-2 ids), with
  the count of each."""
  from sedd_jax.data import tokenizers

  ids = np.concatenate(seqs) if seqs else np.zeros((0,), np.int32)
  tok = tokenizers.ProteinTokenizer()
  counts = {a: int(np.sum(ids == tok.encode(a)[0])) for a in tokenizers.RARE_RESIDUES}
  return {"nonstandard_fraction": sum(counts.values()) / max(ids.size, 1),
          "nonstandard_counts": counts}


def read_eval_data(args, cfg) -> tuple[list[str], list[np.ndarray]]:
  """(names, id arrays) of the evaluation sequences."""
  from sedd_jax.data import pipeline
  from sedd_jax.data import store as store_lib

  if args.fasta:
    names, seqs = read_fasta_tokens(args.fasta, "--fasta", args.max_sequences)
    if not seqs:
      raise CliError(f"--fasta {args.fasta} holds no sequence to evaluate")
  else:
    root = pipeline.resolve_path(cfg.data.prepared)
    try:
      st = reference.require_sequences(store_lib.Store(root, args.split))
    except (OSError, ValueError) as e:
      raise CliError(f"--split {args.split}: {e}") from None
    n = len(st) if not args.max_sequences else min(len(st), args.max_sequences)
    names = [f"{args.split}_{i}" for i in range(n)]
    seqs = [np.asarray(st[i]).astype(np.int32) for i in range(n)]
  return names, seqs


def pseudo_perplexity(model, graph, seqs: list[np.ndarray], max_length: int, *,
                      mask_frac: float, num_samples: int, batch_size: int, seed: int) -> dict:
  """`likelihood.pseudo_perplexity_summary` of `seqs` (cropped to max_length), in batches of
  one compiled shape; batch b draws its masks from fold_in(key(seed + 1), b)."""
  import jax
  from flax import nnx

  from sedd_jax.sampling import likelihood

  width = max(min(len(s), max_length) for s in seqs)
  tokens, lengths = reference.pad_tokens([s[:max_length] for s in seqs], width)
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, key, x0, lengths):
    fn = likelihood.model_log_score_fn(nnx.merge(graphdef, state))
    return likelihood.masked_nll(key, fn, graph, x0, lengths=lengths, mask_frac=mask_frac,
                                 num_samples=num_samples)

  nll, count = [], []
  for b, lo in enumerate(range(0, len(seqs), batch_size)):
    idx = np.resize(np.arange(lo, min(lo + batch_size, len(seqs))), batch_size)
    out = jax.device_get(run(state, jax.random.fold_in(jax.random.key(seed + 1), b), tokens[idx],
                             lengths[idx]))
    real = min(batch_size, len(seqs) - lo)  # repeated fillers are dropped
    nll.append(np.asarray(out[0])[:real])
    count.append(np.asarray(out[1])[:real])
  return likelihood.pseudo_perplexity_summary(np.concatenate(nll), np.concatenate(count),
                                              mask_frac)


def check_args(args) -> None:
  """CliError for flag values evaluate cannot run (`--antithetic` sets --t-sampling)."""
  if args.antithetic:
    args.t_sampling = "antithetic"
  if args.num_samples < 1 or (args.t_sampling == "antithetic" and args.num_samples % 2):
    raise CliError(f"--num-samples must be >= 1 (and even for antithetic); got "
                   f"{args.num_samples}")
  if args.batch_size < 1:
    raise CliError(f"--batch-size must be >= 1; got {args.batch_size}")
  if not 0.0 <= args.t_min < 1.0:
    raise CliError(f"--t-min must be in [0, 1); got {args.t_min}")
  if not 0.0 < args.mask_frac < 1.0 or args.pppl_samples < 1:
    raise CliError(f"--mask-frac must be in (0, 1) and --pppl-samples >= 1; got "
                   f"{args.mask_frac}, {args.pppl_samples}")
  if args.max_sequences is not None and args.max_sequences < 1:
    raise CliError(f"--max-sequences must be >= 1; got {args.max_sequences}")
  check_seed(args.seed)


def check_paths(args, out_path: pathlib.Path, cfg) -> None:
  """CliError unless the JSON `out_path` can be written without replacing an input or landing
  in the run's checkpoints or data store (`cli.check_outputs`; `cfg`: the checkpoint's config,
  None when not known yet)."""
  from sedd_jax import config as config_lib

  src_flag = "--workdir" if args.workdir else "--checkpoint"
  run_files, keep_out = inference.protected_paths(args.workdir or args.checkpoint, src_flag, cfg)
  inputs = [("--fasta", args.fasta), ("--baseline-fasta", args.baseline_fasta),
            ("--config", config_lib.split_spec(args.config)[0] if args.config else None),
            *run_files]
  check_outputs({"--out" if args.out else "--out (default)": out_path}, inputs, keep_out)


def unigram_nll(cfg, eval_tokens, train=None, train_source: str | None = None, stats=None,
                stats_file: str | None = None) -> tuple[float | None, str | None]:
  """(the unigram baseline in nats per token over the 25 residue letters on the same (cropped)
  tokens, what it was fitted on): fitted on `train` (--baseline-fasta, named `train_source`),
  else on the residue counts of `stats` (a bundle's `DataStats`, read from `stats_file`), else
  on the config's training split; (None, None), with a warning naming cfg.data.prepared,
  without any of them."""
  from sedd_jax.data import tokenizers
  from sedd_jax.sampling import likelihood

  residue_ids = tokenizers.ProteinTokenizer().encode(tokenizers.RESIDUES)
  if train is None and stats is not None and "protein" in stats.tracks:
    counts = stats.tracks["protein"].token_counts
    by_id = {int(i): counts.get(a, 0) for a, i in zip(tokenizers.RESIDUES, residue_ids)}
    return (likelihood.unigram_baseline_from_counts(by_id, eval_tokens, vocab=residue_ids),
            f"{stats.source}:train (its counts in {stats_file})")
  if train is None:
    train, train_source = reference.training_tokens(cfg), f"{cfg.data.prepared}:train"
  if train is None:
    logger.warning("no unigram baseline: no prepared training data at %s (data.prepared) and "
                   "no data_stats.json; give --baseline-fasta", cfg.data.prepared)
    return None, None
  return likelihood.unigram_baseline(train, eval_tokens, vocab=residue_ids), train_source


def summary_line(summary: dict, shares: dict, unigram: float | None, pppl: dict | None,
                 fitted_on: str) -> str:
  """The one-line result printed to stdout and logged."""
  from sedd_jax.data import tokenizers

  rare = ", ".join(f"{a} {n}" for a, n in shares["nonstandard_counts"].items() if n)
  msg = (f"nelbo/token {summary['nelbo_per_token']:.4f} nats (SE {summary['se_per_token']:.4f}), "
         f"perplexity {summary['perplexity']:.3f} over {summary['num_tokens']} tokens of "
         f"{summary['num_sequences']} sequences; non-standard residues "
         f"{100 * shares['nonstandard_fraction']:.2f}% of the tokens" + (f" ({rare})" if rare
                                                                         else ""))
  msg += f", {summary['bits_per_residue']:.4f} bits/residue"
  if unigram is not None:
    msg += (f"; unigram baseline {unigram:.4f} nats/token (perplexity {math.exp(unigram):.3f}; "
            f"add-one frequencies of the {len(tokenizers.RESIDUES)} residue letters "
            f"{tokenizers.RESIDUES} in {fitted_on})")
  if pppl is not None:
    msg += (f"; {pppl['mask_frac']:.0%}-masked pseudo-perplexity {pppl['pseudo_perplexity']:.3f}"
            f" ({pppl['masked_bits_per_residue']:.4f} bits/residue over "
            f"{pppl['masked_tokens']} masked tokens)")
  return msg


def per_sequence(names: list[str], results) -> list[dict]:
  """One {name, nelbo, se, tokens} entry per evaluated sequence, from the batches' results."""
  return [{"name": n, "nelbo": float(v), "se": float(e), "tokens": int(t)}
          for n, v, e, t in zip(names, np.concatenate([r.nelbo for r in results]),
                                np.concatenate([r.se for r in results]),
                                np.concatenate([r.tokens for r in results]))]


def run(args) -> int:
  from sedd_jax.data import tokenizers
  from sedd_jax.sampling import likelihood

  check_args(args)
  out_path = pathlib.Path(args.out) if args.out else default_out(args)
  # The outputs and the data are checked before the model is built and loaded.
  peeked = inference.read_config(args.workdir or args.checkpoint)
  check_paths(args, out_path, peeked)
  if peeked is not None and inference.is_protein_ligand(peeked):
    pl_evaluate.check_protein_ligand_args(args)
  data = None
  if args.fasta or (peeked is not None and not inference.is_protein_ligand(peeked)):
    data = read_eval_data(args, peeked)
  train = None
  if args.baseline_fasta:
    train = read_fasta_tokens(args.baseline_fasta, "--baseline-fasta")[1]
  loaded = inference.load_model(args.workdir or args.checkpoint, args.weights,
                                args.config)
  model, cfg, graph, noise = loaded.model, loaded.cfg, loaded.graph, loaded.noise
  other = peeked is None or cfg.to_dict() != peeked.to_dict()  # another checkpoint was loaded
  if other:
    check_paths(args, out_path, cfg)
  if inference.is_protein_ligand(cfg):
    return pl_evaluate.run_protein_ligand(args, loaded, out_path)
  max_length = int(cfg.model.length)
  # A split is read again when another checkpoint (of another config) was loaded than peeked.
  if data is None or (not args.fasta and other):
    data = read_eval_data(args, cfg)
  names, seqs = data
  cropped = sum(len(s) > max_length for s in seqs)
  if cropped:
    logger.warning("%d of %d sequences are longer than the model's length %d and are cropped",
                   cropped, len(seqs), max_length)
  eval_tokens = [s[:max_length] for s in seqs]
  scores = loaded.score(eval_tokens, num_samples=args.num_samples, seed=args.seed,
                        batch_size=args.batch_size, t_sampling=args.t_sampling,
                        t_min=args.t_min, pack=args.pad_to == "pack")
  results = [scores.to_nelbo_result()]
  summary = likelihood.summarize(results, noise, total_se=scores.total_se)
  pppl = None
  if graph.absorb and not args.no_pseudo_perplexity:
    pppl = pseudo_perplexity(model, graph, seqs, max_length, mask_frac=args.mask_frac,
                             num_samples=args.pppl_samples, batch_size=args.batch_size,
                             seed=args.seed)

  shares = residue_shares(eval_tokens)
  # A bundle's training data's token counts need no data store.
  stats = loaded.data_stats() if loaded.source.get("kind") == "bundle" else None
  unigram, fitted_on = unigram_nll(cfg, eval_tokens, train, args.baseline_fasta, stats,
                                   f"{loaded.source['path']}/data_stats.json")
  out = {
      "source": args.workdir or args.checkpoint, **inference.provenance(loaded),
      "data": args.fasta or f"{cfg.data.prepared}:{args.split}",
      "num_samples": args.num_samples, "t_sampling": args.t_sampling, "t_min": args.t_min,
      "seed": args.seed, "cropped_sequences": int(cropped), "model_length": max_length,
      "pad_to": args.pad_to,
      **summary, **shares,
      "unigram_nll_per_token": unigram,
      "unigram_perplexity": math.exp(unigram) if unigram is not None else None,
      "unigram_bits_per_residue": unigram / math.log(2) if unigram is not None else None,
      "pseudo_perplexity": pppl,
      "unigram_alphabet": tokenizers.RESIDUES,
      "unigram_fitted_on": fitted_on,
      "per_sequence": per_sequence(names, results),
  }
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(json_safe(out), indent=2, allow_nan=False))
  msg = summary_line(summary, shares, unigram, pppl, out["unigram_fitted_on"])
  logger.info("%s -> %s", msg, out_path)
  sys.stdout.write(msg + "\n")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the exit code (2 on a bad input, with a one-line error)."""
  return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
  sys.exit(main())
