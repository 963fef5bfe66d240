#!/usr/bin/env bash
# The gate before FlexLoRA's claim (docs/results.md, claim 1): does rank matter at all in this federation? FedIT
# with every client at r2 (the bucket) against every client at r50 (the paper's client types scaled by 0.25),
# with what gives rank its chance: rsLoRA's s_r = alpha / sqrt(r) (alpha / r scales an r50 update 25x below an r2
# one), LoRA on attention and MLP as FlexLoRA's released code places it, 10 local steps a round and 15 rounds;
# 2 seeds. Prints r50 minus r2 on the same seed (final held-out loss; negative: rank helps) and each run's figures.
# If r50 is better by more than the seeds' spread, the bucket comparison (experiments/flexlora_distributions.sh
# with SCALING=rslora and these settings) is worth its 5 seeds; if not, the claim is not testable at this scale.
# About 4-5 CPU-hours on a 2-core CPU; finished runs are skipped and interrupted ones resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/common.sh
CONFIG=${CONFIG:-configs/comparison-ni.yaml}
OUT=${OUT:-runs/flexlora-gate}
SEEDS=${SEEDS:-0,1}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
restore_records
sweep_into fedit-ranks "$SEEDS" strategy.name=fedit resources.distribution=uniform resources.rank_scale=0.25 \
  adapter.use_rslora=true "adapter.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]" \
  client.local_steps=10 federation.rounds=15 --set resources.force=min,max
"$PY" - "$OUT/fedit-ranks" <<'PY'
import json, statistics, sys
from pathlib import Path

runs = {}
for metrics in Path(sys.argv[1]).glob("*/metrics.jsonl"):
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    name = metrics.parent.name  # ...force-min_seed-0
    force = "r50" if "force-max" in name else "r2"
    runs.setdefault(name.rsplit("_seed-", 1)[1], {})[force] = records[-1]["eval_loss"]
diffs = [v["r50"] - v["r2"] for v in runs.values() if len(v) == 2]
for seed, v in sorted(runs.items()):
    print(f"seed {seed}: " + ", ".join(f"{k} {x:.4f}" for k, x in sorted(v.items())))
if diffs:
    spread = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    print(f"r50 minus r2, same seed: mean {statistics.mean(diffs):+.4f}, per seed {[round(d, 4) for d in diffs]}, std {spread:.4f}")
PY
