#!/usr/bin/env bash
# Claim 3 of docs/results.md (FFA-LoRA at least as good as LoRA, better and more stable under DP, at half the
# upload) in a setting where DP-SGD has data to learn from: BoolQ, configs/ffa-boolq-dp.yaml (MiniLM, 10 IID
# clients of about 1,000 examples, batches of 64, 20 rounds of 10 steps). On a 2-core CPU one run is hours; the
# grid is sized for a GPU (`model.device: auto` takes the first CUDA GPU). Three sweeps, 3 seeds each:
#   main   LoRA (fedit) and FFA-LoRA x {no DP; epsilon 6, 3, 1 x clipping C 1, 2, 5}: 2 x 10 x 3 = 60 runs
#   alpha  LoRA's (and FFA-LoRA's) scaling alpha in {4, 16, 64}, without DP and at epsilon 3 (C 1), so that the
#          sensitivity is measured both ways: 2 x 3 x 2 x 3 = 36 runs (the alpha-16 cells repeat main's)
# The base model's row (no adapter training: a new head, so about the class prior) is base-model_seed-N.json.
# Finished cells are skipped and interrupted ones resumed: re-run until it completes. Each sweep writes its
# compare.md (mean ± std over seeds per setting); `fedlora compare` at the end puts each grid in one table.
# EXTRA adds overrides to every run (e.g. EXTRA="federation.rounds=1 client.local_steps=1" for a smoke run),
# SEEDS changes the seeds, OUT the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/common.sh
OUT=${OUT:-runs/ffa-boolq}
SEEDS=${SEEDS:-0,1,2}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
PY=${PY:-.venv/bin/python}
CONFIG=configs/ffa-boolq-dp.yaml
read -r -a EXTRA_OVERRIDES <<< "${EXTRA:-}"

PRIVACY="{enabled: false}"
for epsilon in 6 3 1; do for clip in 1.0 2.0 5.0; do
  PRIVACY="$PRIVACY,{enabled: true, target_epsilon: $epsilon, max_grad_norm: $clip}"
done; done
ALPHA_PRIVACY="{enabled: false},{enabled: true, target_epsilon: 3, max_grad_norm: 1.0}"

mkdir -p "$OUT"
"$PY" experiments/boolq_data.py > /dev/null
for seed in ${SEEDS//,/ }; do  # the anchor row: the untrained adapter and head on each seed's test examples
  base_model "$seed" "${EXTRA_OVERRIDES[@]}"
done
for strategy in fedit ffa-lora; do
  sweep_into "main-$strategy" "$SEEDS" "strategy.name=$strategy" "${EXTRA_OVERRIDES[@]}" --set "privacy=$PRIVACY"
done
for strategy in fedit ffa-lora; do
  sweep_into "alpha-$strategy" "$SEEDS" "strategy.name=$strategy" "${EXTRA_OVERRIDES[@]}" \
    --set "adapter.alpha=4,16,64" --set "privacy=$ALPHA_PRIVACY"
done
"$FEDLORA" compare "$OUT"/main-fedit/*seed-* "$OUT"/main-ffa-lora/*seed-* --output "$OUT/compare-main"
"$FEDLORA" compare "$OUT"/alpha-fedit/*seed-* "$OUT"/alpha-ffa-lora/*seed-* --output "$OUT/compare-alpha"
