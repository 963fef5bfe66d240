#!/usr/bin/env bash
# FedMeZO's five learning-rate rules and first-order FedAvg (AdamW) on one federation (docs/fedmezo.md),
# two runs at a time (one torch thread each), then one comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/fedmezo}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
CONFIG=configs/fedmezo-reasoning.yaml
source experiments/common.sh
mkdir -p "$OUT"
rule() { echo "strategy.options={eps: 1.0e-3, lr_strategy: $1, lr_spread: 0.5, upload: seeds}"; }
run fedavg-adamw strategy.name=fedavg client.optimizer=adamw client.lr=3.0e-4 client.local_steps=7 strategy.options={} & run mezo-frozen "$(rule frozen)" & wait
run mezo-random "$(rule random)" & run mezo-round-wise "$(rule round-wise)" & wait
run mezo-five-round "$(rule five-round)" & run mezo-model-diff "$(rule model-diff)" & wait
"$FEDLORA" compare "$OUT"/fedavg-adamw "$OUT"/mezo-* --output "$OUT/compare"
