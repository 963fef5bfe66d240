#!/usr/bin/env bash
# The FlexLoRA bucket-effect experiment (docs/flexlora.md): four methods on one federation, two at a time
# (one torch thread each on a 2-core machine), then one comparison table and plot.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/flexlora-ni-bucket.yaml
OUT=${OUT:-runs/ni-bucket}
SEED=${SEED:-0}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
source experiments/common.sh
mkdir -p "$OUT"
run flexlora "federation.seed=$SEED" strategy.name=flexlora & run hetlora "federation.seed=$SEED" strategy.name=hetlora & wait
run fedit-min "federation.seed=$SEED" strategy.name=fedit resources.force=min & run fedit-max "federation.seed=$SEED" strategy.name=fedit resources.force=max & wait
"$FEDLORA" compare "$OUT"/flexlora "$OUT"/hetlora "$OUT"/fedit-min "$OUT"/fedit-max --output "$OUT/compare"
