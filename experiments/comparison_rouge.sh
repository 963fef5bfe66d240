#!/usr/bin/env bash
# ROUGE-L (greedy generation, 64 new tokens) of every seed-0 run of the comparison and of the base model on
# seed 0's held-out clients; each run keeps its generations in RUN/eval/test.predictions.jsonl, so the table
# can pair the methods example by example. Finished evaluations are skipped, and a run being evaluated is
# locked (RUN/eval.lock), so two copies of this script can share the list (one per core).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/comparison-ni.yaml}
OUT=${OUT:-runs/comparison}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
PY=${PY:-.venv/bin/python}
for run in "$OUT"/part*/*_seed-0 "$OUT"/hetero/*_seed-0; do
  [ -d "$run/global" ] || continue
  [ -f "$run/eval/test.json" ] && continue
  mkdir "$run/eval.lock" 2>/dev/null || continue  # another copy is on it
  "$FEDLORA" eval "$run" --split test "eval.metrics=[loss, rouge-l]" eval.batch_size=24 > "$run/rouge.log" 2>&1 \
    || { rmdir "$run/eval.lock"; exit 1; }
  rmdir "$run/eval.lock"
done
target="$OUT/base-model_seed-0_rouge.json"
[ -f "$target" ] || "$PY" experiments/base_model_eval.py "$CONFIG" "eval.final_metrics=[rouge-l]" eval.batch_size=24 federation.seed=0 \
  data.seed=0 adapter.init_seed=0 faults.seed=0 > "$target.tmp" && mv "$target.tmp" "$target"
