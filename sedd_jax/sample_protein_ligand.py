"""The protein-ligand half of `python -m sedd_jax.sample` (checkpoints with `cfg.task ==
"protein_ligand"`; the flags are documented in `sedd_jax.sample`).

- `check_protein_ligand_args(args, cfg)`: the task to sample; CliError for flags that do not
  apply or do not fit the config (checked before the model is loaded).
- `extra_outputs(args, cfg)`: the files written beside --out (SMILES, validity report), for
  the output checks made before the model is loaded.
- `run_protein_ligand(args, loaded, t_start)`: ligand_given_protein / protein_given_ligand
  (one track given the other, optionally with classifier-free guidance) or joint pairs from
  noise, drawn by the `api.ProteinLigandModel` `loaded` (`sample_ligands`, `sample_proteins`,
  `sample_pairs`: sample i from its own key, whatever --batch-size); writes --out and the SMILES
  validity report, each recording the checkpoint used (`inference.provenance`).
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import numpy as np

from sedd_jax import config as config_lib
from sedd_jax import inference
from sedd_jax.cli import CliError
from sedd_jax.cli import sampler_options
from sedd_jax.data import reference

logger = logging.getLogger("sedd_jax.sample")

PL_TASKS = config_lib.PROTEIN_LIGAND_CHOICES["sampling.task"]


def check_protein_ligand_args(args, cfg) -> str:
  """The task to sample for a protein-ligand checkpoint of config `cfg`; CliError for flags that
  do not apply or do not fit the config."""
  unused = [f for f in ("prefix", "suffix", "template", "infill", "lengths") if getattr(args, f)]
  unused += [f for f in ("motif", "cached", "report", "allow_rare") if getattr(args, f)]
  if unused:
    raise CliError(f"--{unused[0].replace('_', '-')} does not apply to protein-ligand "
                   "checkpoints")
  task = args.task or str(cfg.sampling.task)
  if task not in PL_TASKS:
    raise CliError(f"--task {task!r}: choose one of {PL_TASKS}")
  if task != "ligand_given_protein" and args.proteins:
    raise CliError(f"--proteins gives proteins; {task} does not take them")
  if args.proteins and not pathlib.Path(args.proteins).is_file():
    raise CliError(f"--proteins {args.proteins} does not exist")
  if task == "joint" and args.guidance is not None:
    raise CliError("--guidance applies to the conditional tasks, not joint")
  if args.remask or args.draw != "unbiased":
    raise CliError("--remask and --draw are for protein checkpoints")
  if args.batch_size < 1:
    raise CliError(f"--batch-size must be >= 1; got {args.batch_size}")
  sampler_options(args, cfg, temperature=args.temperature, reveal_order=args.reveal_order)
  p_len, l_len = int(cfg.model.length), int(cfg.ligand.length)
  for flag, value, top in (("--ligand-length", args.ligand_length, l_len),
                           ("--length", args.length, p_len)):
    if value is not None and not 1 <= value <= top:
      raise CliError(f"{flag} {value} must lie in [1, {top}]")
  if args.checker == "rdkit":
    from sedd_jax.protein_ligand import smiles as smiles_lib
    try:
      smiles_lib.validity_checker("rdkit")
    except ImportError:
      raise CliError("--checker rdkit: rdkit is not installed (pip install -e '.[chem]')") from None
  return task


def extra_outputs(args, cfg) -> dict[str, pathlib.Path]:
  """{label: path} of the files the task of `cfg` (or --task) writes beside --out: the
  validity report `<out stem>.validity.json` of the ligands, and for joint the SMILES file
  `<out stem>.smi`; CliError when that is --out itself."""
  task = args.task or str(cfg.sampling.task)
  out = pathlib.Path(args.out)
  outputs = {}
  if task == "joint":
    outputs["the SMILES file (<out stem>.smi)"] = out.with_suffix(".smi")
    if out.with_suffix(".smi") == out:
      raise CliError(f"--out {out}: joint writes FASTA there and the SMILES to <stem>.smi; give "
                     "another suffix (e.g. .fasta)")
  if task in ("joint", "ligand_given_protein"):
    outputs["the validity report (<out stem>.validity.json)"] = out.with_suffix(".validity.json")
  return outputs


def run_protein_ligand(args, loaded, t_start: float) -> int:
  """Samples one track of a protein-ligand model given the other (see the module docstring)
  through the `api.ProteinLigandModel` `loaded` (`sample_ligands` / `sample_proteins`)."""
  from sedd_jax.data import tokenizers
  from sedd_jax.protein_ligand import conditional

  cfg = loaded.cfg
  source = inference.provenance(loaded)
  task = check_protein_ligand_args(args, cfg)
  p_len, l_len = int(cfg.model.length), int(cfg.ligand.length)
  store, smiles_tok = reference.reference_pairs(cfg, args.split)
  rng = np.random.default_rng(args.seed)
  ptok = tokenizers.ProteinTokenizer()
  steps, predictor, eps = sampler_options(args, cfg, temperature=args.temperature,
                                          reveal_order=args.reveal_order)
  reverse = {"steps": steps, "predictor": predictor, "eps": eps,
             "temperature": args.temperature, "reveal_order": args.reveal_order,
             "seed": args.seed, "batch_size": args.batch_size}
  if task == "joint":
    return run_joint(args, loaded, store, smiles_tok, rng, reverse, source, t_start)

  if args.proteins:
    names, given, each, targets, refs = _given_proteins(args, store, ptok, rng, p_len, l_len)
  else:
    names, given, each, targets, refs = _given_pairs(args, task, store, smiles_tok, ptok, p_len,
                                                     l_len)
  n = len(names)
  bs = min(args.batch_size, n)
  guidance = 1.0 if args.guidance is None else args.guidance
  try:
    drop = conditional.context_drop(cfg, task)
  except ValueError as e:
    raise CliError(str(e)) from None
  logger.info("%s: %d samples, %s, %d steps, eps %g, batch %d, seed %d, guidance %g (context "
              "dropped in training with probability %.2f; proteins cropped to the model length "
              "%d)", task, n, predictor, steps, eps, bs, args.seed, guidance, drop, p_len)
  try:
    if task == "ligand_given_protein":
      samples = loaded.sample_ligands(given, num_per_protein=each, ligand_length=targets,
                                      guidance=guidance, **reverse)
    else:
      samples = loaded.sample_proteins(given, num_per_ligand=each, length=targets,
                                       guidance=guidance, **reverse)
  except ValueError as e:
    raise CliError(str(e)) from None
  settings = {"task": task, **run_settings(args, steps, predictor, eps, bs, source),
              "guidance": guidance, "given": args.proteins or f"{cfg.data.prepared}:{args.split}"}
  _write_conditional(args, task, list(samples), targets, names, refs, settings, t_start)
  return 0


def _given_proteins(args, store, ptok, rng, p_len: int, l_len: int):
  """(names, given proteins (cropped to the model length), samples of each, target ligand
  lengths, references) for --proteins FASTA: each record --num times, ligand lengths
  --ligand-length or drawn from the split's ligands."""
  from sedd_jax.data import fasta as fasta_lib

  names, given, each = [], [], args.num or 1
  try:
    for rec in fasta_lib.read_fasta(args.proteins, fasta_lib.Skips(hint="")):
      x = ptok.encode(rec.text, source=str(args.proteins), line=rec.line, name=rec.name)
      names += [rec.name] * each
      given.append(ptok.decode(x[:p_len]))
  except ValueError as e:
    raise CliError(str(e)) from None
  if not given:
    raise CliError(f"--proteins {args.proteins}: no records")
  ref_lengths = store.track("ligand").lengths
  targets = (np.full((len(names),), args.ligand_length, np.int32) if args.ligand_length
             else np.minimum(rng.choice(ref_lengths, len(names)), l_len).astype(np.int32))
  return names, given, each, targets, [""] * len(names)


def _given_pairs(args, task: str, store, smiles_tok, ptok, p_len: int, l_len: int):
  """(names, given proteins or SMILES, 1 sample of each, target lengths, reference SMILES) of
  the first --num pairs of --split (proteins cropped to the model length); target lengths =
  the reference's (or --ligand-length / --length)."""
  n = min(args.num or 8, len(store))
  names = [f"{args.split}_{i}" for i in range(n)]
  prots = [np.asarray(store.get(i, "protein"))[:p_len] for i in range(n)]
  ligs = [np.asarray(store.get(i, "ligand"))[:l_len] for i in range(n)]
  refs = [smiles_tok.decode(x) for x in ligs]
  if task == "ligand_given_protein":
    return (names, [ptok.decode(x) for x in prots], 1,
            np.array([args.ligand_length or len(x) for x in ligs], np.int32), refs)
  return names, refs, 1, np.array([args.length or len(x) for x in prots], np.int32), refs


def _write_conditional(args, task, samples: list[str], targets, names, refs, settings,
                       t_start: float) -> None:
  """--out: `SMILES<TAB>name` lines and the validity report (ligands), or FASTA (proteins)."""
  n = len(names)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  if task == "ligand_given_protein":
    out.write_text("".join(f"{x}\t{name}\n" for x, name in zip(samples, names)))
    write_validity(out, samples, names, [int(t) for t in targets], settings, args.checker,
                   t_start, references=refs)
  else:
    with open(out, "w") as f:
      for i, seq in enumerate(samples):
        f.write(f">sample_{i} ligand={refs[i]} ref={names[i]} length={len(seq)} "
                + " ".join(f"{k}={v}" for k, v in settings.items()) + f"\n{seq}\n")
    logger.info("wrote %d proteins to %s (%.1f s in all)", n, out, time.perf_counter() - t_start)


def run_settings(args, steps: int, predictor: str, eps: float, bs: int, source: dict) -> dict:
  """The settings every protein-ligand output records (FASTA headers, validity report), with
  the checkpoint used (`source`: `inference.provenance`)."""
  return {"steps": steps, "predictor": predictor, "eps": eps,
          "temperature": args.temperature, "reveal_order": args.reveal_order, "seed": args.seed,
          "batch_size": bs, **source}


def write_validity(out: pathlib.Path, smiles: list[str], names: list[str], lengths: list[int],
                   settings: dict, checker: str | None, t_start: float,
                   references: list[str] | None = None) -> dict:
  """Writes `<out stem>.validity.json`: the settings, `smiles.validity_report` of `smiles` (with
  the checker used) and one entry per sample; returns the report."""
  from sedd_jax.protein_ligand import smiles as smiles_lib

  report = smiles_lib.validity_report(smiles, checker or "auto")
  valid = report.pop("valid")
  report = {**settings, **report, "samples": [
      {"name": nm, "smiles": x, "valid": v, "length": t}
      | ({"reference": references[i]} if references else {})
      for i, (nm, x, v, t) in enumerate(zip(names, smiles, valid, lengths))]}
  json_path = out.with_suffix(".validity.json")
  json_path.write_text(json.dumps(report, indent=2))
  logger.info("%d SMILES valid %d/%d = %.3f (checker: %s) -> %s (%.1f s in all)", len(smiles),
              report["num_valid"], report["num"], report["validity"], report["checker"],
              json_path, time.perf_counter() - t_start)
  return report


def run_joint(args, loaded, store, smiles_tok, rng, reverse: dict, source: dict,
              t_start: float) -> int:
  """Samples protein-ligand pairs from noise (`--task joint`; see the module docstring) with
  `loaded.sample_pairs`; `reverse` = its sampler, seed and batch-size arguments, `source` =
  `inference.provenance` of the checkpoint."""
  cfg = loaded.cfg
  out = pathlib.Path(args.out)
  smi_path = out.with_suffix(".smi")
  p_len, l_len = int(cfg.model.length), int(cfg.ligand.length)
  n = 8 if args.num is None else args.num
  if n < 1:
    raise CliError(f"--num must be >= 1; got {n}")
  pairs = rng.choice(len(store), n)  # each sample takes both lengths of one reference pair
  plens, llens = (np.full((n,), fixed, np.int32) if fixed else np.minimum(
      np.asarray(store.track(track).lengths)[pairs], top).astype(np.int32)
                  for fixed, track, top in ((args.length, "protein", p_len),
                                            (args.ligand_length, "ligand", l_len)))
  steps, predictor, eps = reverse["steps"], reverse["predictor"], reverse["eps"]
  bs = min(args.batch_size, n)
  logger.info("joint: %d pairs, %s, %d steps, eps %g, batch %d, seed %d", n, predictor, steps,
              eps, bs, args.seed)
  try:
    drawn = loaded.sample_pairs(n, length=plens, ligand_length=llens, **reverse)
  except ValueError as e:
    raise CliError(str(e)) from None
  seqs, smiles = [p for p, _ in drawn], [x for _, x in drawn]
  names = [f"sample_{i}" for i in range(n)]
  settings = {"task": "joint", **run_settings(args, steps, predictor, eps, bs, source),
              "lengths_from": f"{cfg.data.prepared}:{args.split}"}
  out.parent.mkdir(parents=True, exist_ok=True)
  report = write_validity(out, smiles, names, [int(t) for t in llens], settings, args.checker,
                          t_start)
  with open(out, "w") as f:
    for name, seq, smi, ok in zip(names, seqs, smiles, report["samples"]):
      f.write(f">{name} ligand={smi} ligand_valid={int(ok['valid'])} length={len(seq)} "
              + " ".join(f"{k}={v}" for k, v in settings.items()) + f"\n{seq}\n")
  smi_path.write_text("".join(f"{x}\t{name}\n" for x, name in zip(smiles, names)))
  logger.info("wrote %d pairs: proteins to %s, ligands to %s", n, out, smi_path)
  return 0
