#!/usr/bin/env bash
# The ablation study, end to end: encoder pretraining -> per seed: Tuna-R alignment and the four
# arms -> the comparison report. Re-running resumes (finished runs are left as they are).
#
#   bash experiments/ablations/run.sh                     # ROOT=runs/ablations, SEEDS="0 1 2"
#   ROOT=/data/study SEEDS="0 1 2 3" JOBS=2 bash experiments/ablations/run.sh
#
# JOBS runs that many arms at once (each arm's runs are independent once alignment is done).
# Extra arguments go to every arm's training run (not to alignment), e.g.
# --config.total_steps=600.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=${ROOT:-runs/ablations}
SEEDS=${SEEDS:-0 1 2}
JOBS=${JOBS:-1}
ARMS="tuna2 tuna2_masking tuna_r tuna_r_masking"

python -m tuna2_jax.pretrain_encoder --config=experiments/siglip_shapes.py \
    --workdir="$ROOT/siglip_shapes"
for seed in $SEEDS; do
  python -m tuna2_jax.train --config="experiments/ablations/tuna_r_align.py:seed=$seed,root=$ROOT" \
      --workdir="$ROOT/tuna_r_align/seed$seed"
done
export EXTRA_ARGS="$*"
for seed in $SEEDS; do
  for arm in $ARMS; do
    echo "experiments/ablations/$arm.py:seed=$seed,root=$ROOT $ROOT/$arm/seed$seed"
  done
done | xargs -P "$JOBS" -L 1 bash -c \
    'mkdir -p "$(dirname "$2")" && python -m tuna2_jax.train --config="$1" --workdir="$2" \
         $EXTRA_ARGS > "$2.log" 2>&1 || { echo "failed: $2 (see $2.log)"; exit 1; }' _ \
    || { echo "some runs failed; the others finished (re-running resumes them)"; exit 1; }
runs=""
for arm in $ARMS; do
  for seed in $SEEDS; do runs="$runs $ROOT/$arm/seed$seed"; done
done
python -m tuna2_jax.compare $runs --out="$ROOT/report"
