#!/usr/bin/env bash
# GPU recipe (docs/recipe_small.md): SEDD-small on the bundled UniProt sample, one H200.
#   bash scripts/recipe_small.sh                 # ~25 min of training, then evaluate and sample
#   MINUTES=20 STEPS=10000 bash scripts/recipe_small.sh
#   STAGE=train|post (default all: train, then curve, evaluate and samples); EXTRA: more train
#   flags, e.g. EXTRA=--config.data.pad_to=full for the padded baseline of docs/packing.md
# Training stops at STEPS or after MINUTES (whichever comes first; checkpoints every EVAL_EVERY
# steps, so at most EVAL_EVERY steps are lost to the time limit). EMA 0.999 instead of 0.9999:
# a 0.9999 average would still be dominated by the first few thousand steps of so short a run.
set -uo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${WORKDIR:-runs/recipe_small}
MINUTES=${MINUTES:-25}
STEPS=${STEPS:-15000}
EVAL_EVERY=${EVAL_EVERY:-500}
BATCH=${BATCH:-128}
LENGTH=${LENGTH:-512}
NUM=${NUM:-256}
STAGE=${STAGE:-all}
case "$STAGE" in
  all|train|post) ;;
  *) echo "STAGE=$STAGE: choose all, train or post" >&2; exit 2 ;;
esac

if [ "$STAGE" != post ]; then
  timeout "${MINUTES}m" python -m sedd_jax.train --config=configs/uniref50.py:small \
    --workdir "$WORKDIR" --config.model.length="$LENGTH" --config.training.batch_size="$BATCH" \
    --config.training.steps="$STEPS" --config.training.eval_every="$EVAL_EVERY" \
    --config.training.eval_batches=2 --config.training.ckpt_every="$EVAL_EVERY" \
    --config.training.sample_every=0 --config.training.ema=0.999 --config.optim.warmup=1000 \
    --config.wandb.mode=disabled ${EXTRA:-}
  rc=$?
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then exit "$rc"; fi  # 124: stopped by the time limit
fi
[ "$STAGE" = train ] && exit 0

python scripts/recipe_curve.py "$WORKDIR" || exit 1
python -m sedd_jax.evaluate --workdir "$WORKDIR" --split valid --max-sequences "$((2 * NUM))" \
  --num-samples 16 --batch-size 64 --out "$WORKDIR/eval_valid.json" || exit 1
python -m sedd_jax.sample --workdir "$WORKDIR" --num "$NUM" --lengths from-data \
  --predictor first_hitting --batch-size 128 --out "$WORKDIR/samples_first_hitting.fasta" \
  --report || exit 1
python -m sedd_jax.sample --workdir "$WORKDIR" --num "$NUM" --lengths from-data --steps 256 \
  --batch-size 128 --out "$WORKDIR/samples_analytic256.fasta" --report || exit 1
python -m sedd_jax.sample --workdir "$WORKDIR" --num "$NUM" --lengths from-data --steps 256 \
  --remask 0.02 --batch-size 128 --out "$WORKDIR/samples_remask.fasta" --report || exit 1
