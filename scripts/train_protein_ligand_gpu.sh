#!/usr/bin/env bash
# Issue 19 on one GPU: train configs/protein_ligand.py:small (mode `all`) on the bundled
# protein-ligand pairs for a fixed wall time, then sample ligands for the test split's proteins
# (guidance W = 1 and W = 2) and protein-ligand pairs from noise, and print one JSON line per
# sampling run: RDKit validity, exact matches with the pair's reference ligand, and how many
# valid ligands are copies of training ligands.
#
#   bash scripts/train_protein_ligand_gpu.sh [RUN_DIR]   (default runs/pl_small_gpu)
#
# Environment: TRAIN_SECONDS (default 1500: the trainer gets SIGTERM then, finishes its step and
# writes a checkpoint), NUM (samples per run, default 64), RDKIT_WHEEL (a wheel file to install
# when rdkit is missing and PyPI is out of reach), CONFIG (default configs/protein_ligand.py:small;
# `:tiny` for a CPU smoke test), STAGE (all | train | sample; default all: about 28 minutes on
# one H200), EXTRA (more `--config.*` overrides of the training, e.g.
# EXTRA='--config.mode_weights=(0.1,0.2,0.4,0.1,0.2)'), SAMPLES (the sampling runs of
# STAGE=sample, default `w1 t0.3 w2 joint`; `t<T>`, e.g. t0.5, samples as w1 at temperature T;
# `c<T>` as t<T> with the confidence reveal order; a suffix `s<seed>` draws with another seed,
# e.g. t0.3s1; t0.3 is BENCHMARKS.md's majority-valid setting), PREDICTOR (of the w1/w2 runs and
# of the in-training samples, default first_hitting; `analytic` samples as the runs before
# issue 19 did), JOINT_PREDICTOR (of the joint run, default analytic). Why first_hitting: a run
# of `small` (8,802 steps, mode_weights above) nearly memorised the ligands (valid loss 7.26 nats
# per pair), yet only 12.5% (W=1) / 14% (W=2) of its analytic-predictor ligands (128 steps) were
# valid SMILES: near-copies of training ligands with a few wrong tokens. The analytic predictor
# reveals several tokens per step, each drawn on its own, so tokens revealed together can come from
# different memorised ligands; first_hitting reveals one token per model call (exact for
# the absorbing graph). Under a 10-minute limit per command, start the training
# in its own session
# (`STAGE=train setsid nohup bash scripts/train_protein_ligand_gpu.sh RUN > train.log 2>&1 &`)
# and run `STAGE=sample` once it has written RUN/train_seconds.
# The first run on an H200 (400 s) spent 272 s compiling (validation 97 s, first step 175 s) and
# reached 1,072 steps with no valid SMILES (BENCHMARKS.md): hence 1500 s by default.
# Overrides for a run this short: EMA 0.999 (0.9999 would still be mostly the initial weights),
# warmup 500, no dropout; 64 ligands for validation proteins every 1,000 steps, their SMILES
# validity logged as `sample` rows of metrics.jsonl (validity against steps).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/pl_small_gpu}
TRAIN_SECONDS=${TRAIN_SECONDS:-1500}
NUM=${NUM:-64}
CONFIG=${CONFIG:-configs/protein_ligand.py:small}
STAGE=${STAGE:-all}
PREDICTOR=${PREDICTOR:-first_hitting}
JOINT_PREDICTOR=${JOINT_PREDICTOR:-analytic}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! python -c "import rdkit" 2>/dev/null; then
  if [ -n "${RDKIT_WHEEL:-}" ]; then
    pip install -q --no-deps "$RDKIT_WHEEL"
  else
    pip install -q 'rdkit>=2023.9' || {
      echo "rdkit is missing (pip install -e '.[chem]', or set RDKIT_WHEEL)" >&2; exit 1; }
  fi
fi

if [ "$STAGE" != sample ]; then
  start=$(date +%s)
  timeout --preserve-status -k 120 -s TERM "$TRAIN_SECONDS" \
    python -m sedd_jax.train --config="$CONFIG" --workdir "$RUN" --fresh \
    --config.training.ema=0.999 --config.optim.warmup=500 --config.model.dropout=0.0 \
    --config.training.eval_every=1000 --config.training.sample_every=1000 \
    --config.training.num_samples=64 --config.sampling.predictor="$PREDICTOR" \
    --config.training.ckpt_every=1000 --config.wandb.mode=disabled ${EXTRA:-}
  echo $(( $(date +%s) - start )) > "$RUN/train_seconds"
fi
[ "$STAGE" = train ] && exit 0

sample() {  # sample.py with the run's newest checkpoint, RDKit as the checker
  python -m sedd_jax.sample --workdir "$RUN" --num "$NUM" --batch-size "$NUM" --checker rdkit \
    --seed "$seed" "$@"
}
SAMPLES=${SAMPLES:-w1 t0.3 w2 joint}
for name in $SAMPLES; do
  base=$name seed=0
  case $name in *s[0-9]*) base=${name%s*} seed=${name##*s} ;; esac
  case $base in
    w1) sample --task ligand_given_protein --split test --guidance 1 --predictor "$PREDICTOR" \
          --out "$RUN/ligands_$name.smi" ;;
    w2) sample --task ligand_given_protein --split test --guidance 2 --predictor "$PREDICTOR" \
          --out "$RUN/ligands_$name.smi" ;;
    joint) sample --task joint --split test --predictor "$JOINT_PREDICTOR" \
          --out "$RUN/pairs${name#joint}.fasta" ;;
    t*) sample --task ligand_given_protein --split test --guidance 1 --predictor "$PREDICTOR" \
          --temperature "${base#t}" --out "$RUN/ligands_$name.smi" ;;
    c*) sample --task ligand_given_protein --split test --guidance 1 --predictor first_hitting \
          --reveal-order confidence --temperature "${base#c}" --out "$RUN/ligands_$name.smi" ;;
    *) echo "SAMPLES: unknown run '$name' (choose from w1 w2 joint t<T> c<T>, each with an" \
         "optional s<seed>)" >&2; exit 2 ;;
  esac
done

python - "$RUN" "$(cat "$RUN/train_seconds")" $SAMPLES <<'EOF'
import json, pathlib, sys

import jax

from sedd_jax.data import pipeline, store as store_lib
from sedd_jax.training import checkpointer, metrics

run, train_seconds, names = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
cfg = json.loads((run / "config.json").read_text())
store = store_lib.Store(pipeline.resolve_path(cfg["data"]["prepared"]), "train")
tok = store.smiles_tokenizer()
train_smiles = {tok.decode(store.get(i, "ligand")) for i in range(len(store))}
rows = metrics.read_metrics(run / metrics.METRICS_FILE)
last_eval = [r for r in rows if r["kind"] == "eval"][-1]
for name in names:
  stem = "pairs" + name[5:] if name.startswith("joint") else "ligands_" + name
  rep = json.loads((run / f"{stem}.validity.json").read_text())
  samples = rep["samples"]
  valid = [s["smiles"] for s in samples if s["valid"]]
  print(json.dumps({
      "bench": f"protein_ligand_{cfg['variant']}", "device": jax.devices()[0].device_kind,
      "task": rep["task"], "guidance": rep.get("guidance"), "predictor": rep["predictor"],
      "temperature": rep["temperature"], "reveal_order": rep["reveal_order"], "seed": rep["seed"],
      "steps": rep["steps"], "checker": rep["checker"],
      "num": rep["num"], "validity": rep["validity"],
      "reference_match": (sum(s["smiles"] == s.get("reference") for s in samples) / len(samples)
                          if "reference" in samples[0] else None),
      "valid_in_train": sum(s in train_smiles for s in valid) / max(len(valid), 1),
      "unique_valid": len(set(valid)),
      "train_steps": checkpointer.Checkpointer(run).all_steps()[-1],
      "train_seconds": train_seconds, "valid_loss": last_eval.get("valid_loss")}))
EOF
python scripts/pl_validity_figure.py "$RUN" --summary "$RUN/validity_summary.json" \
  --png "$RUN/validity.png"
