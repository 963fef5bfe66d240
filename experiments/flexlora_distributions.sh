#!/usr/bin/env bash
# FlexLoRA's claim (docs/results.md, claim 1): FlexLoRA beats the bucket-limited baseline and gains more as more
# clients have high ranks. The comparison's federation (configs/comparison-ni.yaml: Natural Instructions task
# clients, 20 held-out task clients, zero-shot loss and ROUGE-L) with the paper's four client types scaled by
# 0.25 (r2, r8, r8, r50 on q/v), for each of the paper's four distributions (uniform, heavy-tail-light,
# heavy-tail-strong, normal as FlexLoRA's released code draws it): FlexLoRA (with the untruncated Delta evaluated
# next to its rank-r_max truncation) and HetLoRA; FedIT with every client at the smallest rank (the bucket) and
# at the largest (the upper bound), which do not depend on the distribution; and the base model. Seed by seed
# (each: split, held-out clients, rank assignment, initialisation, sampling), two runs at a time (one torch
# thread each). Finished runs are skipped and interrupted ones resumed: re-run until it completes.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/comparison-ni.yaml}
OUT=${OUT:-runs/flexlora-distributions}
SEEDS=${SEEDS:-0,1,2}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
HETERO="resources.rank_scale=0.25 eval.final_metrics=[rouge-l] eval.batch_size=24"
DISTRIBUTIONS="resources.distribution=uniform,heavy-tail-light,heavy-tail-strong,normal"
sweep() { local out=$1 seed=$2; shift 2; "$FEDLORA" sweep "$CONFIG" $HETERO "$@" --seeds "$seed" \
  --output "$OUT/$out" --no-progress >> "$OUT/$out.log" 2>&1; }
for seed in ${SEEDS//,/ }; do
  { sweep flexlora "$seed" strategy.name=flexlora 'strategy.options={evaluate_full_delta: true}' --set "$DISTRIBUTIONS"
    sweep fedit-min "$seed" strategy.name=fedit resources.distribution=uniform resources.force=min; } &
  { sweep hetlora "$seed" strategy.name=hetlora --set "$DISTRIBUTIONS"
    sweep fedit-max "$seed" strategy.name=fedit resources.distribution=uniform resources.force=max; } &
  wait
  target="$OUT/base-model_seed-$seed.json"
  [ -f "$target" ] || "$PY" experiments/base_model_eval.py "$CONFIG" "eval.final_metrics=[rouge-l]" eval.batch_size=24 \
    "federation.seed=$seed" "data.seed=$seed" "adapter.init_seed=$seed" "faults.seed=$seed" > "$target.tmp" \
    && mv "$target.tmp" "$target"
done
"$PY" experiments/results_tables.py flexlora "$OUT"
