"""Generation metrics: greedy generations scored against the reference outputs.

- ``rouge-l``: ROUGE-L F-measure (rouge-score, Porter stemming) of the generation against the reference,
  the Natural Instructions / FlexLoRA metric, averaged over examples (``eval_rouge_l``, in [0, 1]).
- ``exact-match``: 1 if the normalised generation equals the normalised reference, else 0
  (``eval_exact_match``); normalisation lower-cases, removes punctuation, the articles a/an/the and
  extra white space (SQuAD's rule).
- ``task-score``: reasoning-gym's own scorer of each example's task (``score_answer(answer, entry)``, in
  [0, 1], partial credit where the task gives it), averaged (``eval_task_score``); reasoning-gym data only.

Generations: the prompt exactly as in training (:func:`fedlora.data.encoding.render_prompt`), cut from the
left to ``max_seq_len`` tokens, left-padded in batches (all clients' examples in one pass, sorted by prompt
length, so batches are full and padding short), greedy decoding of at most ``max_new_tokens``,
stopped at EOS. Both metrics share one generation pass. Client figures are averaged over examples
(sum over clients of n_c * metric_c / sum n_c) and reported with ``eval_generated`` (how many examples).
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from typing import Any

import torch

from fedlora.compute import model_device
from fedlora.data.encoding import Encoder, render_prompt
from fedlora.data.examples import ClientData, Example

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse white space."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def task_score(prediction: str, example: Example) -> float:
    """reasoning-gym's scorer for the example's task, with the entry rebuilt from the example."""
    import json

    import reasoning_gym

    if example.meta is None or not example.category:
        raise ValueError("task-score needs reasoning-gym examples (data.source: reasoning-gym)")
    entry = {"question": example.instruction, "answer": example.output, "metadata": json.loads(example.meta)}
    return float(reasoning_gym.get_score_answer_fn(example.category)(prediction, entry) or 0.0)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of ``prediction`` against ``reference`` (0 when either has no scorable token)."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


@torch.no_grad()
def generate(
    model: torch.nn.Module, encoder: Encoder, examples: list[Example], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy generations (the text after the prompt, special tokens removed), one per example."""
    tokenizer = encoder.tokenizer
    pad = tokenizer.pad_token_id
    budget = max(8, encoder.max_seq_len)
    model.eval()
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        prompts = [
            tokenizer(render_prompt(e, tokenizer, encoder.template), add_special_tokens=False)["input_ids"][
                -budget:
            ]
            for e in examples[start : start + batch_size]
        ]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        device = model_device(model)
        causal_lm: Any = model  # a transformers model: generate() is GenerationMixin's, not Module's
        generated = causal_lm.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(generated[:, width:].cpu(), skip_special_tokens=True)
    return [text.strip() for text in out]


# metric name -> (metrics.jsonl key, score(prediction, example))
SCORERS = {
    "rouge-l": ("eval_rouge_l", lambda p, e: rouge_l(p, e.output)),
    "exact-match": ("eval_exact_match", lambda p, e: exact_match(p, e.output)),
    "task-score": ("eval_task_score", task_score),
}
#: the data sources a scorer can score (it uses the source's own scorer); the others score any source
SCORER_SOURCES: dict[str, tuple[str, ...]] = {"task-score": ("reasoning-gym",)}


def evaluate_generation(
    metrics: list[str],
    model: torch.nn.Module,
    encoder: Encoder,
    clients: list[ClientData],
    split: str,
    batch_size: int,
    max_new_tokens: int,
    predictions: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """The requested generation metrics (names in :data:`SCORERS`) from one generation pass; with
    ``predictions``, one record per example is appended to it: client, prompt (instruction and input),
    reference, generation and each score."""
    if encoder.task != "causal-lm":
        raise ValueError(f"eval.metrics {metrics}: generation metrics need model.task causal-lm")
    totals = dict.fromkeys(metrics, 0.0)
    pairs = [(client, example) for client in clients for example in client.split(split)]
    # one generation pass over every client's examples, longest prompts together (less padding; a client's
    # few examples alone would make small batches)
    order = sorted(
        range(len(pairs)), key=lambda i: len(render_prompt(pairs[i][1], encoder.tokenizer, encoder.template))
    )
    texts = generate(model, encoder, [pairs[i][1] for i in order], batch_size, max_new_tokens)
    generated = [""] * len(pairs)
    for i, text in zip(order, texts, strict=True):
        generated[i] = text
    for (client, example), text in zip(pairs, generated, strict=True):
        scores = {name: SCORERS[name][1](text, example) for name in metrics}
        for name in metrics:
            totals[name] += scores[name]
        if predictions is not None:
            predictions.append(
                {
                    "client": client.client_id,
                    "instruction": example.instruction,
                    "input": example.input,
                    "reference": example.output,
                    "generation": text,
                    **{SCORERS[name][0].removeprefix("eval_"): scores[name] for name in metrics},
                }
            )
    count = len(pairs)
    out: dict[str, float] = {"eval_generated": count}
    for name in metrics:
        out[SCORERS[name][0]] = totals[name] / count if count else float("nan")
    return out
