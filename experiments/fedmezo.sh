#!/usr/bin/env bash
# FedMeZO's claims (docs/fedmezo.md, docs/results.md): the five client learning-rate rules as the reference code
# defines them, against first-order FedAvg matched to the reference (SGD at the same rate, steps and batch) and
# against AdamW; 3 seeds (split, initialisation, sampling); 30 rounds with a held-out loss every round, and the
# base model on the same held-out examples; each client's forward passes and every run's peak memory (its
# training processes' too) are in its metrics.jsonl.
#
# One queue of runs, two at a time (2 worker processes each on the 2-core CPU; a 30-round run there is about
# 110 minutes, first-order or zeroth-order alike), in the order of the questions they answer: every seed's base
# model, FedMeZO `frozen` against matched SGD (faster convergence than first-order FedAvg), then the other rules
# (do the personalised rates help), then AdamW. ORDER and SEEDS change the queue. Finished runs are skipped and
# interrupted ones resumed: re-run until it completes; stop it with `kill -- -<its process group>` (each run
# checkpoints its last round and stops). Keep the runs across machines with `python experiments/records.py save`
# and a commit of experiments/records/ (done here at the start: restore).
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/common.sh
OUT=${OUT:-runs/fedmezo}
SEEDS=${SEEDS:-0,1,2}
ORDER=${ORDER:-base frozen sgd round-wise model-diff five-round random adamw}
FEDLORA=${FEDLORA:-.venv/bin/fedlora}
CONFIG=configs/fedmezo-reasoning.yaml
mkdir -p "$OUT"
FIRST_ORDER="strategy.name=fedavg strategy.options={}"
# matched to the reference (FederatedScope-LLM's first-order trainer): plain SGD, no momentum and no gradient
# clipping (its grad.grad_clip defaults to -1, off); fedlora's default clip of 1.0 binds 5-12x on some clients here
MATCHED_SGD="client.optimizer=sgd client.grad_clip=null"

# job WHAT SEED: one run of the grid (WHAT: base, sgd, adamw or a FedMeZO rule)
job() {
  local what=$1 seed=$2
  case $what in
    base) base_model "$seed" ;;
    sgd) sweep_into fedavg-sgd "$seed" $FIRST_ORDER $MATCHED_SGD ;;
    # first-order SGD at its own rates (the matched run uses the zeroth-order 5e-4): the baseline at its best
    sgd-rates) sweep_into fedavg-sgd-rates "$seed" $FIRST_ORDER $MATCHED_SGD --set client.lr=1.0e-3,2.0e-3,5.0e-3 ;;
    adamw) sweep_into fedavg-adamw "$seed" $FIRST_ORDER client.optimizer=adamw client.lr=3.0e-4 ;;
    frozen | random | round-wise | five-round | model-diff)
      sweep_into fedmezo "$seed" --set \
        "strategy.options={eps: 1.0e-3, lr_strategy: $what, lr_rules: reference, lr_spread: 0.5, upload: seeds}" ;;
    *) echo "fedmezo.sh: unknown run '$what' in ORDER (base, sgd, sgd-rates, adamw, frozen, random, round-wise, five-round, model-diff)" >&2
       return 1 ;;
  esac
}
if [ "${1:-}" = --job ]; then job "$2" "$3"; exit; fi

restore_records
for what in $ORDER; do for seed in ${SEEDS//,/ }; do echo "$what $seed"; done; done |
  xargs -P 2 -L 1 bash "$0" --job
"${PY:-.venv/bin/python}" experiments/results_tables.py fedmezo "$OUT"
