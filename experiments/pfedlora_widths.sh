#!/usr/bin/env bash
# pFedLoRA across model widths (docs/pfedlora.md, docs/results.md): MiniLM-6 / MiniLM-2 / SmolLM2-135M[:6]
# clients on BBC News, 3 seeds (each: split, initialisation, sampling). pFedLoRA against standalone local
# training and two model-heterogeneous baselines (LG-FedAvg: shared classifier; FedProto: shared class
# prototypes), each client at the same 10 steps per round (pFedLoRA: 5 local-model + 5 adapter steps; the
# baselines: 10 own-model steps at the local-model rate); then, where the models are equal (all MiniLM-6),
# pFedLoRA against FedAvg of the whole model. Finished runs are skipped, interrupted ones resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/common.sh
CONFIG=configs/pfedlora-widths.yaml
OUT=${OUT:-runs/pfedlora-widths}
SEEDS=${SEEDS:-0,1,2}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
mkdir -p "$OUT"
restore_records
BASELINE="strategy.options={} client.local_steps=10 client.lr=3.0e-4"
sweep() { local out=$1; shift; "$FEDLORA" sweep "$CONFIG" "$@" --seeds "$SEEDS" --output "$OUT/$out" --no-progress >> "$OUT/$out.log" 2>&1; }
HOMO='model.variants=[{num_layers: 6}]'
# two lanes of about equal length: the heterogeneous pair and then the homogeneous pair (cheaper models) in one,
# the two baselines (10 own-model steps per client and round, the longer runs) in the other
{ sweep heterogeneous --set 'strategy.options={local_model_steps: 5, local_model_lr: 3.0e-4, federate: true},{local_model_steps: 5, local_model_lr: 3.0e-4, federate: false}'
  sweep homogeneous "$HOMO" --set 'strategy.options={local_model_steps: 5, local_model_lr: 3.0e-4, share: adapter}'
  sweep homogeneous-fedavg "$HOMO" --set 'strategy.options={local_model_steps: 5, local_model_lr: 3.0e-4, share: model}'; } &
sweep baselines $BASELINE --set strategy.name=lg-fedavg,fedproto &
wait
"$FEDLORA" compare "$OUT"/heterogeneous/*seed-* "$OUT"/baselines/*seed-* --output "$OUT/compare"
"$FEDLORA" compare "$OUT"/homogeneous/*seed-* "$OUT"/homogeneous-fedavg/*seed-* --output "$OUT/compare-homogeneous"
