#!/usr/bin/env bash
# The FlexLoRA bucket-effect experiment (docs/flexlora.md): four methods on one federation, two at a time
# (one torch thread each on a 2-core machine), then one comparison table and plot.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/flexlora-ni-bucket.yaml
OUT=${OUT:-runs/ni-bucket}
SEED=${SEED:-0}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
run() {  # name, overrides...
  local name=$1; shift
  if [ -f "$OUT/$name/global/adapter_model.safetensors" ]; then return; fi
  if [ -f "$OUT/$name/config.yaml" ]; then  # interrupted: continue from its last checkpoint
    "$FEDLORA" run --resume "$OUT/$name" --no-progress >> "$OUT/$name.log" 2>&1
  else
    "$FEDLORA" run "$CONFIG" "federation.seed=$SEED" "$@" --output "$OUT/$name" --no-progress > "$OUT/$name.log" 2>&1
  fi
}
mkdir -p "$OUT"
run flexlora strategy.name=flexlora & run hetlora strategy.name=hetlora & wait
run fedit-min strategy.name=fedit resources.force=min & run fedit-max strategy.name=fedit resources.force=max & wait
"$FEDLORA" compare "$OUT"/flexlora "$OUT"/hetlora "$OUT"/fedit-min "$OUT"/fedit-max --output "$OUT/compare"
