"""Question: does fedlora's benchmark scorer give lm-evaluation-harness's numbers, and how fast is it?

Anchor: lm-evaluation-harness 0.4.13 itself (its official task configs, its ``HFLM`` on the same model
instance, the same items: :mod:`fedlora.testing.lm_eval_reference`). For each task, the first ``--limit``
items are scored by both; the table gives both accuracies, the relative difference of all choice
log-likelihoods, the items on which the two pick different answers, and both items/s (ratio = fedlora /
lm-eval). Prints a table and one JSON line.

    python benchmarks/lm_eval_agreement.py [--model smollm2-135m-instruct] [--limit 100] [--tasks ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from fedlora.compute import cpu_model_name  # noqa: E402
from fedlora.eval.benchmarks import BENCHMARK_TASKS, item_outcomes, load_items, score_items, task_figures  # noqa: E402
from fedlora.models.registry import fetch_builtin  # noqa: E402
from fedlora.testing.lm_eval_reference import lm_eval_loglikelihoods  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--tasks", default=",".join(BENCHMARK_TASKS))
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    folder = fetch_builtin(args.model)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = []
    for name in args.tasks.split(","):
        items = load_items(name, args.limit)
        started = time.perf_counter()
        ours = score_items(model, tokenizer, items, args.batch_size)
        ours_seconds = time.perf_counter() - started
        started = time.perf_counter()
        theirs, figures = lm_eval_loglikelihoods(model, tokenizer, name, items, args.batch_size)
        theirs_seconds = time.perf_counter() - started
        flat = [(a, b) for o, t in zip(ours, theirs, strict=True) for a, b in zip(o, t, strict=True)]
        difference = math.sqrt(sum((a - b) ** 2 for a, b in flat)) / math.sqrt(sum(b * b for _, b in flat))
        mine = task_figures(BENCHMARK_TASKS[name], items, ours)
        differing = sum(
            item_outcomes(item, o)["acc"] != item_outcomes(item, t)["acc"]
            for item, o, t in zip(items, ours, theirs, strict=True)
        )
        rows.append(
            {
                "task": name,
                "n": len(items),
                "fedlora_acc": mine["acc"],
                "lm_eval_acc": figures["acc"],
                "acc_stderr": mine["acc_stderr"],
                "fedlora_acc_norm": mine.get("acc_norm"),
                "lm_eval_acc_norm": figures.get("acc_norm"),
                "loglikelihood_relative_difference": difference,
                "items_differing": differing,
                "fedlora_items_per_second": len(items) / ours_seconds,
                "lm_eval_items_per_second": len(items) / theirs_seconds,
            }
        )
    print(f"{args.model}, float32, {torch.get_num_threads()} threads, CPU {cpu_model_name()}")
    print(
        f"{'task':<16}{'n':>5}{'fedlora acc':>13}{'lm-eval acc':>13}{'rel. diff ll':>14}{'differ':>8}{'items/s':>9}{'ratio':>7}"
    )
    for r in rows:
        ratio = r["fedlora_items_per_second"] / r["lm_eval_items_per_second"]
        print(
            f"{r['task']:<16}{r['n']:>5}{r['fedlora_acc']:>13.4f}{r['lm_eval_acc']:>13.4f}"
            f"{r['loglikelihood_relative_difference']:>14.2e}{r['items_differing']:>8}"
            f"{r['fedlora_items_per_second']:>9.1f}{ratio:>7.2f}"
        )
    print(
        json.dumps(
            {"benchmark": "lm_eval_agreement", "model": args.model, "cpu": cpu_model_name(), "rows": rows}
        )
    )


if __name__ == "__main__":
    main()
