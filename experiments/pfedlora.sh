#!/usr/bin/env bash
# pFedLoRA vs standalone local training on model-heterogeneous BBC News clients (docs/pfedlora.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/pfedlora}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
mkdir -p "$OUT"
"$FEDLORA" sweep configs/pfedlora-bbc.yaml --seeds ${SEEDS:-1,2} --output "$OUT/pfedlora" --no-progress > "$OUT/pfedlora.log" 2>&1 &
"$FEDLORA" sweep configs/pfedlora-bbc.yaml 'strategy.options={local_model_steps: 5, local_model_lr: 3.0e-4, federate: false}' \
  --seeds ${SEEDS:-1,2} --output "$OUT/standalone" --no-progress > "$OUT/standalone.log" 2>&1 &
wait
"$FEDLORA" compare "$OUT"/pfedlora/*seed=* "$OUT"/standalone/*seed=* --output "$OUT/compare"
