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
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
"$FEDLORA" sweep "$CONFIG" "$@" --set strategy.name=fedit,ffa-lora,flexlora,hetlora,rolora --seeds "$SEEDS" \
  --output "$OUT/part1" --no-progress > "$OUT/part1.log" 2>&1 &
"$FEDLORA" sweep "$CONFIG" "$@" --set strategy.name=fedsvd,lora-fair,fedex-lora,flora,fed-sb --seeds "$SEEDS" \
  --output "$OUT/part2" --no-progress > "$OUT/part2.log" 2>&1 &
wait
for seed in ${SEEDS//,/ }; do
  target="$OUT/base-model_seed-$seed.json"
  [ -f "$target" ] || "$PY" experiments/base_model_eval.py "$CONFIG" "$@" eval.final_metrics=[] \
    "federation.seed=$seed" "data.seed=$seed" "adapter.init_seed=$seed" "faults.seed=$seed" > "$target"
done
"$FEDLORA" compare "$OUT"/part1/*_seed-* "$OUT"/part2/*_seed-* --output "$OUT/compare"
