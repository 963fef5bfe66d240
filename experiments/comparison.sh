#!/usr/bin/env bash
# The method comparison (docs/comparison.md): the first-order federated LoRA methods on one federation,
# 3 seeds each (every seed: data split, held-out clients, adapter init, sampling), two runs at a time (one
# torch thread each on a 2-core machine), then the base model on each seed's held-out clients and one table.
# Finished runs are skipped and interrupted ones resumed, so the script can be re-run until it completes.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/comparison-ni.yaml}
OUT=${OUT:-runs/comparison}
SEEDS=${SEEDS:-0,1,2}
SEEDS_HETERO=${SEEDS_HETERO:-0}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
source experiments/common.sh
restore_records  # the runs earlier machines kept in experiments/records/ are skipped
for seed in ${SEEDS//,/ }; do  # seed by seed: every method gets its first seeds before any gets its last
  "$FEDLORA" sweep "$CONFIG" "$@" --set strategy.name=fedit,ffa-lora,flexlora,hetlora,rolora --seeds "$seed" \
    --output "$OUT/part1" --no-progress >> "$OUT/part1.log" 2>&1 &
  "$FEDLORA" sweep "$CONFIG" "$@" --set strategy.name=fedsvd,lora-fair,fedex-lora,flora,fed-sb --seeds "$seed" \
    --output "$OUT/part2" --no-progress >> "$OUT/part2.log" 2>&1 &
  wait
done
# FedKSeed (zeroth-order) at about the first-order runs' forward compute: 5 two-point steps (2 forward passes
# each) against 3 backpropagation steps (about 3 forward passes each)
"$FEDLORA" sweep "$CONFIG" "$@" client.local_steps=5 --set strategy.name=fedkseed --seeds "$SEEDS" \
  --output "$OUT/part3" --no-progress >> "$OUT/part3.log" 2>&1
# heterogeneous ranks (FlexLoRA's setting): the paper's four client types scaled by 0.25 (r2, r8, r8, r50 on
# these attention-only targets), 25% each; the methods that take any rank, and FedIT at the smallest and
# largest rank for everyone (the bucket-effect baselines)
HETERO="resources.distribution=uniform resources.rank_scale=0.25"
"$FEDLORA" sweep "$CONFIG" "$@" $HETERO --set strategy.name=flexlora,hetlora,flora --seeds "$SEEDS_HETERO" \
  --output "$OUT/hetero" --no-progress > "$OUT/hetero.log" 2>&1
"$FEDLORA" sweep "$CONFIG" "$@" $HETERO strategy.name=fedit --set resources.force=min,max --seeds "$SEEDS_HETERO" \
  --output "$OUT/hetero" --no-progress >> "$OUT/hetero.log" 2>&1
for seed in ${SEEDS//,/ }; do
  target="$OUT/base-model_seed-$seed.json"
  [ -f "$target" ] || "$PY" experiments/base_model_eval.py "$CONFIG" "$@" eval.final_metrics=[] \
    "federation.seed=$seed" "data.seed=$seed" "adapter.init_seed=$seed" "faults.seed=$seed" > "$target"
done
"$FEDLORA" compare "$OUT"/part1/*_seed-* "$OUT"/part2/*_seed-* --output "$OUT/compare"
"$FEDLORA" compare "$OUT"/hetero/*_seed-* --output "$OUT/compare-hetero"
bash experiments/comparison_rouge.sh  # ROUGE-L of the seed-0 runs and of the base model (generation is slow)
"$PY" experiments/comparison_table.py "$OUT"
