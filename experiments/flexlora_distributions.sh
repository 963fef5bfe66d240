#!/usr/bin/env bash
# FlexLoRA's claim (docs/results.md, claim 1): FlexLoRA beats the bucket-limited baseline and gains more as more
# clients have high ranks. The comparison's federation (configs/comparison-ni.yaml: Natural Instructions task
# clients, 20 held-out task clients, zero-shot loss and ROUGE-L) with the paper's four client types scaled by
# 0.25 (r2, r8, r8, r50 on q/v), for each of the paper's four distributions (uniform, heavy-tail-light,
# heavy-tail-strong, normal as FlexLoRA's released code draws it): FlexLoRA (with the untruncated Delta evaluated
# next to its rank-r_max truncation) and HetLoRA; FedIT with every client at the smallest rank (the bucket) and
# at the largest (the upper bound), which do not depend on the distribution; and the base model. Seed by seed
# (each: split, held-out clients, rank assignment, initialisation, sampling), two lanes of about equal length
# (one torch thread each). Then one longer FlexLoRA run (uniform, seed 0, ROUNDS_LONG rounds, held-out loss every
# round) for the rounds until its held-out loss flattens. Finished runs are skipped and interrupted ones
# resumed: re-run until it completes.
# SCALING=rslora: the same grid with rsLoRA's s_r = alpha / sqrt(r) (adapter.use_rslora) in runs/flexlora-rslora,
# to test whether alpha / r, which scales an r50 client's update 25x below an r2 client's, is why high-rank
# clients do not help (docs/results.md, claim 1); ROUNDS_LONG=0 skips the longer run.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/common.sh
CONFIG=${CONFIG:-configs/comparison-ni.yaml}
SCALING=${SCALING:-lora}
case $SCALING in
  lora) OUT=${OUT:-runs/flexlora-distributions}; SCALING_SET="" ;;
  rslora) OUT=${OUT:-runs/flexlora-rslora}; SCALING_SET="adapter.use_rslora=true" ;;
  *) echo "SCALING must be lora or rslora, not $SCALING" >&2; exit 2 ;;
esac
SEEDS=${SEEDS:-0,1,2}
ROUNDS_LONG=${ROUNDS_LONG:-20}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
restore_records
HETERO="resources.rank_scale=0.25 eval.final_metrics=[rouge-l] eval.batch_size=24 $SCALING_SET"
DISTRIBUTIONS="resources.distribution=uniform,heavy-tail-light,heavy-tail-strong,normal"
sweep() { local out=$1 seed=$2; shift 2; "$FEDLORA" sweep "$CONFIG" $HETERO "$@" --seeds "$seed" \
  --output "$OUT/$out" --no-progress >> "$OUT/$out.log" 2>&1; }
for seed in ${SEEDS//,/ }; do
  { sweep flexlora "$seed" strategy.name=flexlora 'strategy.options={evaluate_full_delta: true}' --set "$DISTRIBUTIONS"
    sweep fedit-min "$seed" strategy.name=fedit resources.distribution=uniform resources.force=min; } &
  { sweep hetlora "$seed" strategy.name=hetlora --set "$DISTRIBUTIONS"
    sweep fedit-max "$seed" strategy.name=fedit resources.distribution=uniform resources.force=max
    base_model "$seed" "eval.final_metrics=[rouge-l]" eval.batch_size=24; } &
  wait
done
if [ "$ROUNDS_LONG" -gt 0 ]; then
  sweep flexlora-rounds 0 strategy.name=flexlora resources.distribution=uniform "federation.rounds=$ROUNDS_LONG" \
    eval.every=1 "eval.final_metrics=[]"
fi
"$PY" experiments/results_tables.py flexlora "$OUT"
