"""The figure of issue 19: SMILES validity of a protein-ligand run, against training steps and
against the sampler's settings.

Reads a run folder of `scripts/train_protein_ligand_gpu.sh` (its `metrics.jsonl`: the
validation loss of ligand-given-protein and the in-training samples' validity) and the
`.validity.json` reports of `python -m sedd_jax.sample --checker rdkit` (the run's
`ligands_*.validity.json` and any given with `--reports`). Reports of the same setting (reveal
order, temperature, guidance) with other seeds are pooled. Writes a PNG with two panels and a
JSON summary that `--from-summary` redraws the PNG from.

  python scripts/pl_validity_figure.py RUN --reports more/*.validity.json \
    --summary docs/protein_ligand_validity.json --png docs/protein_ligand_validity.png
  python scripts/pl_validity_figure.py --from-summary docs/protein_ligand_validity.json \
    --png docs/protein_ligand_validity.png
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib

from sedd_jax.training import metrics

log = logging.getLogger(__name__)


def summarize(run: pathlib.Path, reports: list[pathlib.Path]) -> dict:
  """{'curve': [{step, valid_loss, validity}], 'settings': [{reveal_order, temperature, guidance,
  seeds, valid, num, reference_match}]} from a run folder and extra validity reports."""
  rows = metrics.read_metrics(run / metrics.METRICS_FILE)
  loss = {r["step"]: r["valid_loss/ligand_given_protein"] for r in rows
          if r["kind"] == "eval" and "valid_loss/ligand_given_protein" in r}
  validity = {r["step"]: r["smiles_validity"] for r in rows if r["kind"] == "sample"}
  curve = [{"step": s, "valid_loss": loss[s], "validity": validity.get(s)} for s in sorted(loss)]
  pooled: dict[tuple, dict] = {}
  for path in sorted(run.glob("ligands_*.validity.json")) + list(reports):
    rep = json.loads(path.read_text())
    if rep.get("task") != "ligand_given_protein":
      continue
    key = (rep["reveal_order"], float(rep["temperature"]), float(rep["guidance"]))
    entry = pooled.setdefault(key, {"reveal_order": key[0], "temperature": key[1],
                                    "guidance": key[2], "seeds": [], "valid": 0, "num": 0,
                                    "reference_match": 0})
    if rep["seed"] in entry["seeds"]:
      raise ValueError(f"{path}: seed {rep['seed']} of {key} is already counted")
    samples = rep["samples"]
    entry["seeds"].append(rep["seed"])
    entry["valid"] += sum(bool(s["valid"]) for s in samples)
    entry["num"] += len(samples)
    entry["reference_match"] += sum(s["smiles"] == s.get("reference") for s in samples)
  settings = sorted(pooled.values(),
                    key=lambda e: (e["reveal_order"], e["guidance"], -e["temperature"]))
  return {"run": str(run), "curve": curve, "settings": settings}


def draw(summary: dict, png: pathlib.Path) -> None:
  """Left: validation loss and in-training validity (T = 1) against step; right: validity of
  each sampler setting, pooled over its seeds, with a line at one half."""
  from matplotlib.figure import Figure  # noqa: PLC0415  (no pyplot)

  fig = Figure(figsize=(12, 4.5), dpi=110)
  ax_loss, ax_set = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.1]})
  steps = [c["step"] for c in summary["curve"]]
  ax_loss.plot(steps, [c["valid_loss"] for c in summary["curve"]], "o-", color="tab:blue")
  ax_loss.set_yscale("log")
  ax_loss.set_xlabel("training step")
  ax_loss.set_ylabel("validation loss, ligand given protein (nats per pair)", color="tab:blue")
  ax_val = ax_loss.twinx()
  sampled = [c for c in summary["curve"] if c["validity"] is not None]
  ax_val.plot([c["step"] for c in sampled], [c["validity"] for c in sampled], "s--",
              color="tab:red")
  ax_val.set_ylim(0, 1)
  ax_val.set_ylabel("RDKit validity, 64 in-training samples (T = 1)", color="tab:red")
  ax_loss.set_title("training")

  labels, values = [], []
  for e in summary["settings"]:
    guidance = "" if e["guidance"] == 1 else f", W = {e['guidance']:g}"
    labels.append(f"{e['reveal_order']}, T = {e['temperature']:g}{guidance}")
    values.append(e["valid"] / e["num"])
  ypos = range(len(labels))
  ax_set.barh(ypos, values, color=["tab:green" if v > 0.5 else "tab:gray" for v in values])
  for y, e in zip(ypos, summary["settings"]):
    ax_set.text(min(e["valid"] / e["num"], 0.8) + 0.01, y,
                f"{e['valid']}/{e['num']} ({len(e['seeds'])} seed{'s' * (len(e['seeds']) > 1)})",
                va="center", fontsize=8)
  ax_set.axvline(0.5, color="k", lw=0.8, ls=":")
  ax_set.set_yticks(list(ypos), labels, fontsize=8)
  ax_set.set_xlim(0, 1)
  ax_set.set_xlabel("RDKit validity of ligands for the test proteins (first_hitting)")
  ax_set.set_title("sampler settings at the last checkpoint")
  fig.tight_layout()
  png.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(png)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("run", nargs="?", type=pathlib.Path, help="a run folder")
  parser.add_argument("--reports", nargs="*", type=pathlib.Path, default=[],
                      help="more .validity.json reports of the run's checkpoint")
  parser.add_argument("--from-summary", type=pathlib.Path, help="redraw from a summary JSON")
  parser.add_argument("--summary", type=pathlib.Path, help="write the summary JSON here")
  parser.add_argument("--png", type=pathlib.Path, required=True)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  if (args.run is None) == (args.from_summary is None):
    parser.error("give a run folder or --from-summary, not both")
  if args.from_summary:
    summary = json.loads(args.from_summary.read_text())
  else:
    summary = summarize(args.run, args.reports)
  if args.summary:
    args.summary.write_text(json.dumps(summary, indent=1) + "\n")
  draw(summary, args.png)
  for e in summary["settings"]:
    log.info("%s T=%g W=%g: %d/%d valid (seeds %s)", e["reveal_order"], e["temperature"],
             e["guidance"], e["valid"], e["num"], e["seeds"])
  log.info("wrote %s", args.png)


if __name__ == "__main__":
  main()
