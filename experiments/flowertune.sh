#!/usr/bin/env bash
# FlowerTune LLM's General-NLP recipe (configs/flowertune-general-nlp.yaml, key for key) scaled to a 2-core CPU,
# then the five benchmarks for the adapter and the base model side by side, and the communication the way the
# leaderboard counts it. What is scaled, and why (each is an override below, visible in the run's config.yaml):
# - federation.rounds=$ROUNDS (FlowerTune: 200): a round here is about 7 minutes (each client trains on one core,
#   60-80 tokens/s), so the run is a few rounds; the cosine lr (5e-5 -> 1e-6) spans the rounds run;
# - data.max_seq_len=256, client.batch_size=8 (FlowerTune: 512, 16): a quarter of the tokens per step;
# - eval.every=2, eval.final_max_clients=4: the held-out loss on 4 clients every other round and after the last
#   (all 20 clients' held-out examples would take longer than the training);
# - the benchmarks on the first $LIMIT items of each task (each accuracy with its standard error).
# The 4-bit base (fp4, as FlowerTune's BitsAndBytesConfig gets it) and gradient checkpointing stay: on this CPU
# they ran at about float32's throughput without checkpointing (51-83 tokens/s per client over 7 rounds, against
# 60 in one float32 round; AMD EPYC, AVX2 only, no bf16 units), so the recipe keeps them.
# Finished steps are skipped: re-run until it completes. Records: python experiments/records.py save.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/common.sh
OUT=${OUT:-runs/flowertune}
ROUNDS=${ROUNDS:-5}
LIMIT=${LIMIT:-100}
TASKS=${TASKS:-mmlu,boolq,piqa,commonsense_qa,openbookqa}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
CONFIG=configs/flowertune-general-nlp.yaml
mkdir -p "$OUT"
restore_records

run general-nlp federation.rounds="$ROUNDS" data.max_seq_len=256 client.batch_size=8 eval.every=2 \
  eval.final_max_clients=4 "eval.tasks=[]"
if [ ! -f "$OUT/general-nlp/eval/tasks.json" ]; then
  "$FEDLORA" eval "$OUT/general-nlp" --tasks "$TASKS" --limit "$LIMIT" --base >> "$OUT/general-nlp.log" 2>&1
fi
if [ ! -f "$OUT/general-nlp/eval/eval.json" ]; then  # the held-out loss, adapter and base, on the same examples
  "$FEDLORA" eval "$OUT/general-nlp" --base >> "$OUT/general-nlp.log" 2>&1
fi
"${PY:-.venv/bin/python}" experiments/flowertune_summary.py "$OUT/general-nlp"
