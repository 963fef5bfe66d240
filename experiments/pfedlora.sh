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
# homogeneous clients (all MiniLM-6): pFedLoRA's adapter against FedAvg of the whole adapter-equipped model
HOMO='model.variants=[{num_layers: 6}]'
"$FEDLORA" sweep configs/pfedlora-bbc.yaml "$HOMO" --seeds ${SEEDS:-1,2} --output "$OUT/homogeneous-pfedlora" --no-progress > "$OUT/homogeneous-pfedlora.log" 2>&1 &
"$FEDLORA" sweep configs/pfedlora-bbc.yaml "$HOMO" 'strategy.options={local_model_steps: 5, local_model_lr: 3.0e-4, share: model}' \
  --seeds ${SEEDS:-1,2} --output "$OUT/homogeneous-fedavg-model" --no-progress > "$OUT/homogeneous-fedavg-model.log" 2>&1 &
wait
"$FEDLORA" compare "$OUT"/homogeneous-pfedlora/*seed=* "$OUT"/homogeneous-fedavg-model/*seed=* --output "$OUT/compare-homogeneous"
