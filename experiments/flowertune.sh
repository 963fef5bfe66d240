#!/usr/bin/env bash
# FlowerTune LLM's General-NLP recipe (configs/flowertune-general-nlp.yaml, key for key) scaled to a 2-core CPU,
# then the five benchmarks for the adapter and the base model side by side, and the communication the way the
# leaderboard counts it. What is scaled, and why (each is an override below, visible in the run's config.yaml):
# - federation.rounds=$ROUNDS (FlowerTune: 200): a 2-core CPU trains SmolLM2 at a few hundred tokens/s; the
#   cosine lr (5e-5 -> 1e-6 across rounds) is FlowerTune's over the rounds run;
# - data.max_seq_len=256, client.batch_size=8 (FlowerTune: 512, 16): a quarter of the tokens per step;
# - model.quantization=null: bitsandbytes' 4-bit layers on this CPU trained at 71-83 tokens/s in a 2-round check
#   (AMD EPYC, AVX2), several times slower than float32, and this is a 135M model that needs no 4-bit to fit;
# - compute.gradient_checkpointing=false: at this size memory is not the limit, time is;
# - benchmarks on the first $LIMIT items of each task (the summary gives each accuracy with its standard error).
# Finished steps are skipped: re-run until it completes. Records: python experiments/records.py save.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/common.sh
OUT=${OUT:-runs/flowertune}
ROUNDS=${ROUNDS:-20}
LIMIT=${LIMIT:-200}
TASKS=${TASKS:-mmlu,boolq,piqa,commonsense_qa,openbookqa}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
CONFIG=configs/flowertune-general-nlp.yaml
mkdir -p "$OUT"
restore_records

run general-nlp federation.rounds="$ROUNDS" data.max_seq_len=256 client.batch_size=8 model.quantization=null model.quant_type=nf4 \
  model.double_quant=true model.quant_compute_dtype=null compute.gradient_checkpointing=false "eval.tasks=[]"
if [ ! -f "$OUT/general-nlp/eval/tasks.json" ]; then
  "$FEDLORA" eval "$OUT/general-nlp" --tasks "$TASKS" --limit "$LIMIT" --base >> "$OUT/general-nlp.log" 2>&1
fi
"${PY:-.venv/bin/python}" experiments/flowertune_summary.py "$OUT/general-nlp"
