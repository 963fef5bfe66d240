#!/usr/bin/env bash
# FedMeZO's claims (docs/fedmezo.md, docs/results.md): the five client learning-rate rules as the reference code
# defines them, against first-order FedAvg matched to the reference (SGD at the same rate, steps and batch) and
# against AdamW; 3 seeds (split, initialisation, sampling); 30 rounds with a held-out loss every round; each
# client's forward passes and every run's peak memory are in its metrics.jsonl. Two runs at a time (one torch
# thread each). Finished runs are skipped and interrupted ones resumed: re-run until it completes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/fedmezo}
SEEDS=${SEEDS:-0,1,2}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
CONFIG=configs/fedmezo-reasoning.yaml
mkdir -p "$OUT"
rule() { echo "{eps: 1.0e-3, lr_strategy: $1, lr_rules: reference, lr_spread: 0.5, upload: seeds}"; }
RULES="$(rule frozen),$(rule random),$(rule round-wise),$(rule five-round),$(rule model-diff)"
FIRST_ORDER="strategy.name=fedavg strategy.options={}"
"$FEDLORA" sweep "$CONFIG" --set "strategy.options=$RULES" --seeds "$SEEDS" --output "$OUT/fedmezo" \
  --no-progress >> "$OUT/fedmezo.log" 2>&1 &
{ "$FEDLORA" sweep "$CONFIG" $FIRST_ORDER client.optimizer=sgd --seeds "$SEEDS" --output "$OUT/fedavg-sgd" \
    --no-progress >> "$OUT/fedavg-sgd.log" 2>&1
  "$FEDLORA" sweep "$CONFIG" $FIRST_ORDER client.optimizer=adamw client.lr=3.0e-4 --seeds "$SEEDS" \
    --output "$OUT/fedavg-adamw" --no-progress >> "$OUT/fedavg-adamw.log" 2>&1; } &
wait
"$FEDLORA" compare "$OUT"/fedmezo/*seed-* "$OUT"/fedavg-sgd/*seed-* "$OUT"/fedavg-adamw/*seed-* --output "$OUT/compare"
