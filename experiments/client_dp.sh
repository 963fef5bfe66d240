#!/usr/bin/env bash
# Client-level DP (privacy.unit: client, DP-FedAvg) on the default experiment (8 reasoning-gym clients, 4 a
# round, 5 rounds, SmolLM2-135M-Instruct, LoRA r8 on attention): held-out loss and client-level epsilon per
# round, against the same run without DP. Clipping norm C = 1.3, about the median update norm of the clients'
# first-round updates (1.26-1.33, logged as `update_norm` per client under client-level DP); noise multiplier
# 0.001, 0.01 and 0.1 (epsilon from Opacus's RDP accountant at q = 4/8: astronomically large below 0.1, listed to
# show where the signal survives) and the sigma that keeps epsilon 8 after the 5 rounds. With 4 clients a round
# the noise's std is sigma C / 4 on each of the adapter's 921,600 entries, a norm of about 240 sigma C against a clipped
# mean update of norm <= C: client-level DP needs far more clients a round than this to leave the signal
# standing (McMahan et al. used thousands); the figure says how far. About 15 minutes on a 2-core CPU; finished
# runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/common.sh
CONFIG=${CONFIG:-fedlora/config/builtin/default.yaml}
OUT=${OUT:-runs/client-dp}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
mkdir -p "$OUT"
restore_records
sweep_into default 0 output.plot=false compute.precision=fp32 \
  --set 'privacy={enabled: false},{enabled: true, unit: client, clipping_norm: 1.3, noise_multiplier: 0.001},{enabled: true, unit: client, clipping_norm: 1.3, noise_multiplier: 0.01},{enabled: true, unit: client, clipping_norm: 1.3, noise_multiplier: 0.1},{enabled: true, unit: client, clipping_norm: 1.3, target_epsilon: 8}'
"${PY:-.venv/bin/python}" - "$OUT/default" <<'PY'
import json, sys
from pathlib import Path

for metrics in sorted(Path(sys.argv[1]).glob("*/metrics.jsonl")):
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    eps = [round(r.get("epsilon_client", 0.0), 3) for r in records]
    loss = [round(r["eval_loss"], 4) for r in records if r.get("eval_loss") is not None]
    norms = sorted(c["update_norm"] for r in records for c in r["clients"] if "update_norm" in c)
    median = f", median update norm {norms[len(norms) // 2]:.4f}" if norms else ""
    print(f"{metrics.parent.name}: held-out loss per round {loss}; epsilon per round {eps}{median}")
PY
