"""Sampling CLI: python -m sedd_jax.sample --workdir DIR --num N --length L --out samples.fasta

Loads the model through `sedd_jax.load`: the EMA weights (`--weights raw`: the raw parameters)
of the newest loadable checkpoint of a run (`--workdir DIR`), of one checkpoint folder
(`--checkpoint PATH`) or of an exported bundle (`--workdir BUNDLE`, `python -m
sedd_jax.export`: the same samples as its run), and draws the sequences with
`SeddModel.sample`, which runs the whole reverse process as one compiled program per
batch shape, `--batch-size` sequences at a time, logging progress (batches, seq/s).

Lengths (unconditional): `--length L` for all (default: the model's length), `--lengths FILE`
(one integer per line; N = the number of lines), or `--lengths from-data` (N lengths drawn from
the training split of `cfg.data.prepared`, capped at the model length).

Conditioning (positions are 0-based, spans half-open):
  --prefix SEQ / --suffix SEQ        fixed start / end (combinable) of each sequence
  --motif SEQ@POS ...                motif segments at POS, or at drawn positions (SEQ@? or SEQ),
                                     in a scaffold of the requested length
  --template FASTA                   each record a template: '<mask>' or --mask-char (default
                                     '_') marks positions to generate; --num samples per record
  --infill FASTA                     each record a full sequence whose description holds
                                     `spans=START:END[,START:END...]` to regenerate; --num each

Only the 20 standard amino acids are generated unless --allow-rare (adds X B U Z O): the
sampler zeroes the score of every other token (the rule of `tokenizers.residue_mask`; see
sedd_jax.sampling.sampler), and conditioning that fixes another residue is refused. Same seed,
same output (sequence i from its own key: `SeddModel.sample`; --batch-size does not matter). The flags are checked against the checkpoint's config before the
model is loaded; `--temperature T` (default 1; both kinds of checkpoint) draws each revealed
token from p^(1/T) / Z (T < 1: closer to the model's mode, no longer its distribution), and
`--reveal-order confidence` (first_hitting) reveals the most confident position first;
`--verbose` also shows the INFO lines of jax and orbax. FASTA headers carry
the settings, the seed and the checkpoint used (weights, checkpoint folder, step, run folder:
an older checkpoint when the newest cannot be read); `--report` also writes
`<out>.report.json` and `<out>.report.png` (sampling.report) against the training data. The
seed defaults to 0 (the same samples on every run; the log names it): pass `--seed N` for
others.

Nothing is lost: before the model is loaded, every output path is checked
(`cli.check_outputs`): none may be an input (--template, --infill, --lengths FILE, --proteins,
--config, the run's config.json; the same file through a symlink or a hard link included), lie
inside the run's checkpoints or the data store, be an existing folder, or be unwritable;
missing parent folders are created.

Protein-ligand checkpoints (`cfg.task == "protein_ligand"`; run by
`sedd_jax.sample_protein_ligand`): `--task` (default cfg.sampling.task) picks what is generated
given the other track, clean:
  ligand_given_protein   proteins from `--proteins FASTA` (--num ligands per record, default 1)
                         or the first --num (default 8) pairs of `--split` (default test);
                         ligand lengths = the reference pairs' (FASTA: drawn from the split's
                         ligands) or `--ligand-length N`. Writes `SMILES<TAB>protein name` per
                         line to --out and `<out stem>.validity.json` (fraction of valid SMILES,
                         the checker: RDKit if installed, else the tokenizer's grammar checks).
  protein_given_ligand   ligands of the first --num pairs of --split; protein lengths = the
                         reference proteins' (cropped to the model length) or `--length N`.
                         Writes FASTA.
  joint                  --num (default 8) protein-ligand pairs from noise, both tracks denoised
                         together (sedd_jax.protein_ligand.joint); lengths drawn as pairs from
                         --split (or --length / --ligand-length). Writes FASTA to --out (the
                         ligand in each header), `SMILES<TAB>sample_i` to `<out stem>.smi` and
                         `<out stem>.validity.json`.
`--guidance W` (conditional tasks): classifier-free guidance, log s = W log s(target | given) +
(1 - W) log s(target alone) (sedd_jax.protein_ligand.conditional.guided_log_score); W = 1
(default) is plain conditional sampling. `--predictor first_hitting` applies to all three tasks
(one token per model call; `--remask` and `--draw` are for protein checkpoints). `--checker` picks the SMILES checker of the validity
report (default auto: RDKit if installed, else grammar; the report names the one used).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import re
import sys
import time
from typing import Sequence

import numpy as np

from sedd_jax import inference
from sedd_jax.cli import CliError
from sedd_jax.cli import check_outputs
from sedd_jax.cli import check_seed
from sedd_jax.cli import run_cli
from sedd_jax.cli import sampler_options
from sedd_jax.data import reference
from sedd_jax import sample_protein_ligand as pl_sample

logger = logging.getLogger("sedd_jax.sample")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m sedd_jax.sample", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training run folder (newest loadable checkpoint) or "
                   "exported bundle (python -m sedd_jax.export)")
  src.add_argument("--checkpoint", help="a checkpoint folder (<workdir>/checkpoints/<step>)")
  p.add_argument("--config", help="expected config (file.py[:variant]); its model shape must "
                 "match the checkpoint's")
  p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                 help="the EMA weights (default) or the raw parameters (a bundle holds the "
                 "weights it was exported with)")
  p.add_argument("--num", type=int, default=None, help="number of sequences (per template or "
                 "infill record); default 8")
  lens = p.add_mutually_exclusive_group()
  lens.add_argument("--length", type=int, help="length of every sequence (default: the model's)")
  lens.add_argument("--lengths", help="FILE with one length per line, or 'from-data'")
  p.add_argument("--steps", type=int, help="predictor steps (default cfg.sampling.steps)")
  p.add_argument("--predictor", choices=("analytic", "euler", "first_hitting"),
                 help="default cfg.sampling; first_hitting (absorbing graph) reveals one token per "
                 "model call at its exact time and ignores --steps")
  p.add_argument("--draw", choices=("unbiased", "reference"), default="unbiased",
                 help="categorical draws: unbiased (64-bit noise, default) or reference (the "
                 "reference's float32 draw, which under-samples probabilities below ~1e-7)")
  p.add_argument("--remask", type=float, default=0.0, metavar="ETA",
                 help="remasking probability in [0, 1] (absorbing graph; default 0 = off): the "
                 "ReMDM cap for analytic, a remask-and-redraw move after each reveal for "
                 "first_hitting")
  p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                 help="sampling temperature > 0 (absorbing graph; default 1 = the model's own "
                 "distribution): each revealed token follows p^(1/T) / Z, so T < 1 concentrates "
                 "it on the model's mode (sedd_jax.sampling.sampler.tempered_score)")
  p.add_argument("--reveal-order", choices=("random", "confidence"), default="random",
                 help="first_hitting: reveal a uniform masked position (random, default: exact) "
                 "or the one whose best token is most likely (confidence; exact only for an exact "
                 "score)")
  p.add_argument("--eps", type=float, help="final time (default cfg.sampling.eps)")
  p.add_argument("--seed", type=int, default=0, help="random seed of the sampler and of drawn "
                 "lengths / motif positions (default 0); the same seed gives "
                 "the same output")
  p.add_argument("--out", required=True, help="output FASTA")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--cached", action="store_true", help="reuse the model output while no token "
                 "changes (absorbing graph)")
  p.add_argument("--prefix", metavar="SEQ", help="fixed first residues of every sequence")
  p.add_argument("--suffix", metavar="SEQ", help="fixed last residues of every sequence")
  p.add_argument("--motif", nargs="+", action="extend", default=[], metavar="SEQ@POS",
                 help="motif segments fixed inside the scaffold: SEQ@POS starts SEQ at the "
                 "0-based position POS (MKV@0 = the first three residues); SEQ@? or SEQ alone "
                 "draws the start uniformly among those overlapping nothing else fixed "
                 "(seeded by --seed). Combinable with --prefix/--suffix")
  p.add_argument("--template", help="FASTA of templates")
  p.add_argument("--mask-char", default="_", help="template character to generate (default _)")
  p.add_argument("--infill", help="FASTA of sequences with spans=START:END,... in the header")
  p.add_argument("--allow-rare", action="store_true", help="also generate (and accept as fixed "
                 "residues) X B U Z O")
  p.add_argument("--report", action="store_true", help="write <out>.report.json/.png")
  pl = p.add_argument_group("protein-ligand checkpoints")
  pl.add_argument("--task", choices=pl_sample.PL_TASKS, help="default cfg.sampling.task")
  pl.add_argument("--proteins", help="FASTA of proteins to generate ligands for")
  pl.add_argument("--split", choices=("train", "valid", "test"), default="test",
                  help="reference pairs (default test)")
  pl.add_argument("--ligand-length", type=int, help="ligand length in SMILES tokens")
  pl.add_argument("--guidance", type=float, metavar="W", help="classifier-free guidance weight "
                  "of the conditional tasks (default 1: none)")
  pl.add_argument("--checker", choices=("auto", "rdkit", "grammar"), help="SMILES validity "
                  "checker (default auto: RDKit if installed, else grammar)")
  return p


@dataclasses.dataclass
class Plan:
  """What to sample: per sequence a length, a condition (or None), and a header note."""

  lengths: np.ndarray
  conditions: list
  notes: list[str]


def make_plan(args, cfg, max_length: int) -> Plan:
  """Builds lengths and conditions from the flags (CliError on bad input)."""
  file_modes = [f for f in ("template", "infill") if getattr(args, f)]
  inline = bool(args.prefix or args.suffix or args.motif)
  if len(file_modes) > 1 or (file_modes and inline):
    raise CliError("--template, --infill and --prefix/--suffix/--motif exclude each other")
  num = 8 if args.num is None else args.num
  if num < 1:
    raise CliError(f"--num must be >= 1; got {num}")
  try:
    if file_modes:
      if args.length or args.lengths:
        raise CliError(f"--{file_modes[0]} sets the lengths; drop --length/--lengths")
      return _file_plan(args, file_modes[0], num, max_length)
    rng = np.random.default_rng(args.seed)
    return _inline_plan(args, _plan_lengths(args, cfg, num, max_length, rng), max_length, rng)
  except ValueError as e:
    if isinstance(e, CliError):
      raise
    raise CliError(str(e)) from None


def _file_plan(args, mode: str, num: int, max_length: int) -> Plan:
  """--template / --infill: each FASTA record a condition, `num` samples of each."""
  from sedd_jax.data import fasta as fasta_lib
  from sedd_jax.sampling import conditioning as cond

  conds, notes = [], []
  path = getattr(args, mode)
  if not pathlib.Path(path).is_file():
    raise CliError(f"{path} does not exist")
  for rec in fasta_lib.read_fasta(path, alphabet=None):  # templates keep any character
    name, text = rec.name, rec.text
    if args.template:
      c = cond.template(text, args.mask_char, max_length)
      note = f"template={name}"
    else:
      m = re.search(r"spans=(\S+)", rec.description)
      if not m:
        raise CliError(f"{args.infill}: record {name!r} has no spans=START:END in its header")
      c = cond.infill(text, cond.parse_spans(m.group(1)), max_length)
      note = f"infill={name} spans={m.group(1)}"
    cond.check_residues(c, args.allow_rare, f"--{mode} record {name!r}", "add --allow-rare")
    conds += [c] * num
    notes += [note] * num
  return Plan(np.array([c.length for c in conds], np.int32), conds, notes)


def _plan_lengths(args, cfg, num: int, max_length: int, rng) -> np.ndarray:
  """(N,) int32 lengths of --length, --lengths FILE or --lengths from-data."""
  if args.lengths == "from-data":  # as SeddModel.sample(lengths="from-data") draws them
    from sedd_jax import bundle
    src = args.workdir or args.checkpoint
    stats = bundle.read_data_stats(src) if bundle.is_bundle(src) else bundle.data_stats(cfg)
    if stats is None or "protein" not in stats.tracks:
      raise CliError("--lengths from-data: no prepared training data at "
                     f"{cfg.data.prepared} (run python -m sedd_jax.data.prepare)")
    return stats.tracks["protein"].draw_lengths(num, rng, max_length)
  if args.lengths:
    path = pathlib.Path(args.lengths)
    if not path.is_file():
      raise CliError(f"--lengths {args.lengths}: no such file (or use 'from-data')")
    try:
      lengths = np.array([int(t) for t in path.read_text().split()], np.int32)
    except ValueError:
      raise CliError(f"--lengths {args.lengths}: expected one integer per line") from None
    if lengths.size == 0:
      raise CliError(f"--lengths {args.lengths} is empty")
    return lengths
  return np.full((num,), max_length if args.length is None else args.length, np.int32)


def _inline_plan(args, lengths: np.ndarray, max_length: int, rng) -> Plan:
  """--prefix / --suffix / --motif (or nothing) fixed in sequences of `lengths`, placed as
  `SeddModel.sample` places them (`conditioning.inline`, drawn motif starts from `rng`)."""
  from sedd_jax.sampling import conditioning as cond

  conds = []
  for n in lengths:
    try:
      conds.append(cond.inline(int(n), prefix=args.prefix, suffix=args.suffix,
                               motifs=args.motif, rng=rng, max_length=max_length,
                               allow_rare=args.allow_rare))
    except ValueError as e:
      msg = str(e).replace("pass allow_rare=True", "add --allow-rare")
      for name, flag in (("prefix", "--prefix"), ("suffix", "--suffix"), ("motifs", "--motif")):
        if msg.startswith(f"{name} fixes"):
          msg = flag + msg[len(name):]
      raise CliError(msg) from None
  kinds = [k for k, v in (("prefix", args.prefix), ("suffix", args.suffix),
                          ("motif", args.motif)) if v]
  notes = [f"cond={'+'.join(kinds)} fixed={c.describe()}" if c is not None else "cond=none"
           for c in conds]
  return Plan(lengths, conds, notes)


def check_sedd_args(args, cfg) -> tuple[Plan, int, str, float]:
  """(plan, steps, predictor, eps) for a protein checkpoint of config `cfg`: every check of the
  flags against the config (CliError on bad input)."""
  for flag in ("task", "proteins", "ligand_length", "guidance", "checker"):
    if getattr(args, flag) is not None:
      raise CliError(f"--{flag.replace('_', '-')} is for protein-ligand checkpoints only")
  plan = make_plan(args, cfg, int(cfg.model.length))
  steps, predictor, eps = sampler_options(args, cfg, cached=args.cached, draw=args.draw,
                                          remask=args.remask, temperature=args.temperature,
                                          reveal_order=args.reveal_order)
  return plan, steps, predictor, eps


def check_paths(args, cfg) -> None:
  """CliError unless every output of the run (--out; with --report its JSON and PNG; a
  protein-ligand task's SMILES and validity files) can be written without replacing an input or
  landing in the run's checkpoints or data store (`cli.check_outputs`); `cfg`: the checkpoint's
  config (None: not known yet, only --out is checked against the inputs and the run)."""
  from sedd_jax import config as config_lib

  out = pathlib.Path(args.out)
  outputs = {"--out": out}
  if cfg is not None and inference.is_protein_ligand(cfg):
    outputs.update(pl_sample.extra_outputs(args, cfg))
  elif args.report:
    outputs["--report's JSON"] = out.with_suffix(".report.json")
    outputs["--report's PNG"] = out.with_suffix(".report.png")
  src_flag = "--workdir" if args.workdir else "--checkpoint"
  run_files, keep_out = inference.protected_paths(args.workdir or args.checkpoint, src_flag, cfg)
  inputs = [("--template", args.template), ("--infill", args.infill),
            ("--lengths", args.lengths if args.lengths != "from-data" else None),
            ("--proteins", args.proteins),
            ("--config", config_lib.split_spec(args.config)[0] if args.config else None),
            *run_files]
  check_outputs(outputs, inputs, keep_out)


def run(args) -> int:
  t_start = time.perf_counter()
  if args.batch_size < 1:
    raise CliError(f"--batch-size must be >= 1; got {args.batch_size}")
  check_seed(args.seed)
  # The flags and the outputs are checked against the checkpoint's config before the model is
  # built and loaded.
  peeked = inference.read_config(args.workdir or args.checkpoint)
  check_paths(args, peeked)
  checked = None
  if peeked is not None and not inference.is_protein_ligand(peeked):
    checked = check_sedd_args(args, peeked)
  elif peeked is not None:
    pl_sample.check_protein_ligand_args(args, peeked)
  loaded = inference.load_model(args.workdir or args.checkpoint, args.weights,
                                args.config)
  cfg = loaded.cfg
  if peeked is None or cfg.to_dict() != peeked.to_dict():  # another checkpoint was loaded
    check_paths(args, cfg)
  logger.info("seed %d (the same seed gives the same samples); pass --seed N for other "
              "samples", args.seed)
  if inference.is_protein_ligand(cfg):
    return pl_sample.run_protein_ligand(args, loaded, t_start)
  if checked is None or cfg.to_dict() != peeked.to_dict():
    checked = check_sedd_args(args, cfg)
  plan, steps, predictor, eps = checked
  n = len(plan.lengths)
  logger.info("sampling %d sequences (length %d..%d, model max %d): %s, %d steps, eps %g, "
              "batch %d, seed %d%s", n, plan.lengths.min(), plan.lengths.max(),
              int(cfg.model.length), predictor, steps, eps, args.batch_size, args.seed,
              ", cached" if args.cached else "")
  # The plan's conditions as templates (fixed letters, '_' free): SeddModel.sample draws them.
  conditioned = any(c is not None for c in plan.conditions)
  what = ({"template": [c.describe() for c in plan.conditions], "num": 1} if conditioned
          else {"lengths": plan.lengths.tolist()})
  try:
    seqs = loaded.sample(**what, allow_rare=args.allow_rare, predictor=predictor, steps=steps,
                         eps=eps, temperature=args.temperature, remask=args.remask,
                         draw=args.draw, reveal_order=args.reveal_order, cached=args.cached,
                         seed=args.seed, batch_size=args.batch_size, progress=True)
  except ValueError as e:
    raise CliError(str(e)) from None
  out = pathlib.Path(args.out)
  write_fasta(out, seqs, plan.notes, args, steps, predictor, eps, inference.provenance(loaded))
  logger.info("wrote %d sequences to %s (%.1f s in all)", n, out, time.perf_counter() - t_start)
  if args.report:
    write_report(seqs, cfg, args.seed, out,
                 loaded.data_stats() if loaded.source.get("kind") == "bundle" else None)
  return 0


def write_fasta(out: pathlib.Path, seqs: list[str], notes: list[str], args, steps: int,
                predictor: str, eps: float, source: dict) -> None:
  """The samples as FASTA, each header with the settings that drew it, the checkpoint
  (`source`: `inference.provenance`) and its condition."""
  loaded = " ".join(f"{k}={v}" for k, v in source.items())
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out, "w") as f:
    for i, s in enumerate(seqs):
      f.write(f">sample_{i} length={len(s)} steps={steps} predictor={predictor} eps={eps:g} "
              f"seed={args.seed} batch_size={args.batch_size} cached={int(args.cached)} "
              f"draw={args.draw} remask={args.remask:g} temperature={args.temperature:g} "
              f"reveal_order={args.reveal_order} {loaded} {notes[i]}\n{s}\n")


def write_report(seqs: list[str], cfg, seed: int, out: pathlib.Path, stats=None) -> None:
  """--report: `sampling.report` of the samples against (up to 5000) training sequences; without
  the data store, against the composition of `stats` (a bundle's `DataStats`), novelty skipped
  (one warning naming cfg.data.prepared)."""
  from sedd_jax.data import tokenizers
  from sedd_jax.sampling import report

  tok = tokenizers.ProteinTokenizer()
  data = reference.training_sequences(cfg, limit=5000, seed=seed)
  ref, comp = [], None
  if data is not None:
    ref = [tok.decode(a) for a in data]
  else:
    missing = f"no prepared training data at {cfg.data.prepared} (data.prepared)"
    if stats is not None and "protein" in stats.tracks:
      counts = stats.tracks["protein"].token_counts
      comp = report.composition_from_counts({a: counts.get(a, 0) for a in tokenizers.RESIDUES})
      logger.warning("--report: %s: composition from the bundle's data_stats.json, novelty "
                     "against the training set skipped", missing)
    else:
      logger.warning("--report: %s: comparing with nothing, novelty skipped", missing)
  report.write_report(seqs, ref, out.with_suffix(".report.json"), out.with_suffix(".report.png"),
                      max_length=int(cfg.model.length),  # the cap of --lengths from-data
                      data_composition=comp, missing=None if data is not None else missing)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the exit code (2 on a bad input, with a one-line error)."""
  return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
  sys.exit(main())
