#!/usr/bin/env bash
# Runs the FFA-LoRA/DP and FedMeZO experiments once the FlexLoRA one has finished (one machine, 2 cores).
cd "$(dirname "$0")/.."
while pgrep -f "flexlora_bucket.sh" > /dev/null; do sleep 20; done
bash experiments/ffa_dp.sh
bash experiments/fedmezo.sh
bash experiments/pfedlora.sh
