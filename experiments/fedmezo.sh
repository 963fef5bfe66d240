#!/usr/bin/env bash
# FedMeZO's claims (docs/fedmezo.md, docs/results.md): the five client learning-rate rules as the reference code
# defines them, against first-order FedAvg matched to the reference (SGD at the same rate, steps and batch) and
# against AdamW; 3 seeds (split, initialisation, sampling); 30 rounds with a held-out loss every round, and the
# base model on the same held-out examples; each client's forward passes and every run's peak memory (its
# training processes' too) are in its metrics.jsonl. Seed by seed, two lanes (2 worker processes each on the
# 2-core CPU; a 30-round run there is about 110 minutes, first-order or zeroth-order alike): SGD, two rules and the
# base model; AdamW, three rules. Finished runs are skipped and interrupted ones resumed: re-run until it completes.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/common.sh
OUT=${OUT:-runs/fedmezo}
SEEDS=${SEEDS:-0,1,2}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
CONFIG=configs/fedmezo-reasoning.yaml
mkdir -p "$OUT"
rule() { echo "{eps: 1.0e-3, lr_strategy: $1, lr_rules: reference, lr_spread: 0.5, upload: seeds}"; }
rules() { local joined="" r; for r in "$@"; do joined+="${joined:+,}$(rule "$r")"; done; echo "$joined"; }
FIRST_ORDER="strategy.name=fedavg strategy.options={}"
# matched to the reference (FederatedScope-LLM's first-order trainer): plain SGD, no momentum and no gradient
# clipping (its grad.grad_clip defaults to -1, off); fedlora's default clip of 1.0 binds 5-12x on some clients here
MATCHED_SGD="client.optimizer=sgd client.grad_clip=null"
sweep() { local out=$1 seed=$2; shift 2; "$FEDLORA" sweep "$CONFIG" "$@" --seeds "$seed" --output "$OUT/$out" \
  --no-progress >> "$OUT/$out.log" 2>&1; }
for seed in ${SEEDS//,/ }; do
  { sweep fedavg-sgd "$seed" $FIRST_ORDER $MATCHED_SGD
    sweep fedmezo "$seed" --set "strategy.options=$(rules frozen random)"
    base_model "$seed"; } &
  { sweep fedavg-adamw "$seed" $FIRST_ORDER client.optimizer=adamw client.lr=3.0e-4
    sweep fedmezo "$seed" --set "strategy.options=$(rules round-wise five-round model-diff)"; } &
  wait
done
"${PY:-.venv/bin/python}" experiments/results_tables.py fedmezo "$OUT"
