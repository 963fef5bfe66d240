#!/usr/bin/env bash
# FFA-LoRA vs LoRA (FedIT), no DP and epsilon in {6, 3, 1} (delta 1e-5), 3 seeds each (docs/ffa-lora.md),
# plus the sensitivity to LoRA's alpha (scaling alpha / r) WITHOUT DP (the table in the doc: DP does not learn
# at this scale, so an alpha sweep under DP would compare chance-level runs). Two sweeps at a time (one torch
# thread each on 2 cores), then one comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/ffa-dp}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
PRIVACY='privacy={enabled: false},{enabled: true, target_epsilon: 6},{enabled: true, target_epsilon: 3},{enabled: true, target_epsilon: 1}'
sweep() {  # strategy, output folder, extra overrides..., then sweep options after --
  local strategy=$1 out=$2; shift 2
  local overrides=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do overrides+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  "$FEDLORA" sweep configs/ffa-bbc-dp.yaml "strategy.name=$strategy" "${overrides[@]}" --output "$out" --no-progress "$@" > "$out.log" 2>&1
}
mkdir -p "$OUT"
sweep fedit "$OUT/main-fedit" -- --seeds 1,2,3 --set "$PRIVACY" & sweep ffa-lora "$OUT/main-ffa" -- --seeds 1,2,3 --set "$PRIVACY" & wait
ALPHA='adapter.alpha=4,16,64'
sweep fedit "$OUT/alpha-fedit" privacy.enabled=false -- --seeds 1 --set "$ALPHA" &
sweep ffa-lora "$OUT/alpha-ffa" privacy.enabled=false -- --seeds 1 --set "$ALPHA" & wait
"$FEDLORA" compare "$OUT"/main-fedit/*seed=* "$OUT"/main-ffa/*seed=* --output "$OUT/compare-main"
"$FEDLORA" compare "$OUT"/alpha-fedit/*seed=* "$OUT"/alpha-ffa/*seed=* --output "$OUT/compare-alpha"
