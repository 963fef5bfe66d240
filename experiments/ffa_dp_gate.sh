#!/usr/bin/env bash
# The gate before FFA-LoRA's DP claim (docs/results.md, claim 3): does LoRA (FedIT) learn at all under DP-SGD at
# epsilon 6 in the BBC/MiniLM setting, once it has SGD as the paper trains and a learning rate tuned for it?
# configs/ffa-bbc-dp.yaml with privacy at epsilon 6 (delta 1e-5, C = 1), plain SGD, 20 rounds of 10 local steps
# (the config's 6 x 5 leave DP-SGD 30 noisy steps), learning rate in {0.05, 0.2, 0.5, 2.0}, seed 1.
# It learns when the best rate's final accuracy is at least 0.5: more than twice the majority topic's share of
# BBC News (sport, 511 of 2,225 = 0.23). If it does, the grid {LoRA, FFA} x epsilon {6, 3, 1} x 3 seeds is worth
# running, each method at its own tuned rate; if not, the DP claim stays untestable in this setting.
# About 10 minutes a run on a 2-core CPU (AMD EPYC, AVX2), 40 in all; finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/common.sh
CONFIG=${CONFIG:-configs/ffa-bbc-dp.yaml}
OUT=${OUT:-runs/ffa-dp-gate}
RATES=${RATES:-0.05,0.2,0.5,2.0}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
restore_records
sweep_into lora-eps6 1 strategy.name=fedit privacy.enabled=true privacy.target_epsilon=6 client.optimizer=sgd \
  federation.rounds=20 client.local_steps=10 --set "client.lr=$RATES"
"$PY" - "$OUT/lora-eps6" <<'PY'
import json, sys
from pathlib import Path

rows = []
for metrics in sorted(Path(sys.argv[1]).glob("*/metrics.jsonl")):
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    last = records[-1]
    rows.append((metrics.parent.name, last["round"], last["eval_accuracy"], last["eval_macro_f1"], last.get("epsilon_max")))
for name, rnd, acc, f1, eps in rows:
    print(f"{name}: round {rnd}, accuracy {acc:.3f}, macro-F1 {f1:.3f}, epsilon {eps:.2f}")
if rows:
    best = max(rows, key=lambda r: r[2])
    verdict = "learns" if best[2] >= 0.5 else "does not learn"
    print(f"best {best[0]}: accuracy {best[2]:.3f} -> LoRA at epsilon 6 {verdict} (threshold 0.5)")
PY
