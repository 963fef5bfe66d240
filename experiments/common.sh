# Shared by the experiment scripts: run NAME OVERRIDES... into $OUT/NAME with $CONFIG, or continue it from its
# last checkpoint if an earlier attempt was interrupted; a finished run is skipped.
run() {
  local name=$1; shift
  if [ -d "$OUT/$name/global" ]; then return; fi  # written last, atomically: the run is finished
  if [ -f "$OUT/$name/config.yaml" ]; then
    "$FEDLORA" run --resume "$OUT/$name" --no-progress >> "$OUT/$name.log" 2>&1
  else
    "$FEDLORA" run "$CONFIG" "$@" --output "$OUT/$name" --no-progress > "$OUT/$name.log" 2>&1
  fi
}

# sweep_into NAME SEEDS [OVERRIDES / --set AXIS ...]: one `fedlora sweep` grid of $CONFIG over SEEDS into $OUT/NAME,
# its output appended to $OUT/NAME.log; finished cells are skipped and interrupted ones resumed.
sweep_into() {
  local name=$1 seeds=$2; shift 2
  "$FEDLORA" sweep "$CONFIG" "$@" --seeds "$seeds" --output "$OUT/$name" --no-progress >> "$OUT/$name.log" 2>&1
}

# base_model SEED [KEY=VALUE...]: the base model (no adapter training, B = 0) evaluated on the seed's held-out
# examples, one JSON line in $OUT/base-model_seed-SEED.json (written once, atomically): a claim table's anchor row.
base_model() {
  local seed=$1; shift
  local target="$OUT/base-model_seed-$seed.json"
  if [ ! -f "$target" ]; then
    "${PY:-.venv/bin/python}" experiments/base_model_eval.py "$CONFIG" --seed "$seed" "$@" \
      > "$target.tmp" 2>> "$OUT/base-model.log" && mv "$target.tmp" "$target"
  fi
}

# restore_records: bring back into runs/ the finished runs that earlier machines kept in experiments/records/ (their
# configs and metrics; weights are never kept, only their checksums in weights.json), so they are skipped; an
# unfinished record is not restored (no checkpoint is kept) and runs again from round 1.
restore_records() {
  "${PY:-.venv/bin/python}" experiments/records.py restore experiments/records runs
}

# best_rate SWEEP_DIR [METRIC]: the client.lr of the sweep's run with the highest final METRIC (eval_accuracy):
# a one-seed rate sweep's choice, printed for the next stage of a script.
best_rate() {
  "${PY:-.venv/bin/python}" - "$1" "${2:-eval_accuracy}" <<'PY'
import json, sys
from pathlib import Path

import yaml

best = None
for metrics in sorted(Path(sys.argv[1]).glob("*/metrics.jsonl")):
    last = json.loads(metrics.read_text().splitlines()[-1])
    lr = float(yaml.safe_load((metrics.parent / "config.yaml").read_text())["client"]["lr"])
    if best is None or last[sys.argv[2]] > best[0]:
        best = (last[sys.argv[2]], lr)
if best is None:
    raise SystemExit(f"no finished rate sweep in {sys.argv[1]}")
print(best[1])
PY
}
