"""Held-out loss: the model's mean loss on each client's examples, averaged over clients by examples.

Causal LM: an example's loss is the mean cross-entropy over its response tokens (labels != -100);
client loss = mean over its examples; the federation figure sum_c n_c loss_c / sum_c n_c equals the mean
over all examples. Perplexity = exp(loss). Classification adds accuracy (argmax of the logits) and
macro-F1 over the pooled examples: the mean over classes c (those that occur as a label or a prediction)
of F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c).
"""

from __future__ import annotations

import math

import torch

from fedlora.client.loss import example_losses
from fedlora.data.encoding import Encoder, collate
from fedlora.data.examples import ClientData


@torch.no_grad()
def per_example(
    model: torch.nn.Module, encoded: list[dict], batch_size: int, pad_token_id: int, task: str
) -> tuple[list[float], list[int]]:
    """Per-example loss (and, for classification, the predicted class)."""
    losses: list[float] = []
    predicted: list[int] = []
    for start in range(0, len(encoded), batch_size):
        batch_losses, batch_predicted = example_losses(
            model, collate(encoded[start : start + batch_size], pad_token_id), task
        )
        losses += batch_losses.tolist()
        if batch_predicted is not None:
            predicted += batch_predicted.tolist()
    return losses, predicted


def macro_f1(labels: list[int], predicted: list[int]) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in ``labels`` or ``predicted``."""
    classes = sorted(set(labels) | set(predicted))
    scores = []
    for c in classes:
        tp = sum(1 for y, p in zip(labels, predicted, strict=True) if y == c and p == c)
        fp = sum(1 for y, p in zip(labels, predicted, strict=True) if y != c and p == c)
        fn = sum(1 for y, p in zip(labels, predicted, strict=True) if y == c and p != c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores) if scores else float("nan")


def evaluate_loss(
    model: torch.nn.Module, encoder: Encoder, clients: list[ClientData], split: str, batch_size: int
) -> dict[str, float]:
    """``eval_loss`` (+ ``eval_perplexity``, or ``eval_accuracy`` and ``eval_macro_f1``), ``eval_examples``,
    ``eval_clients``."""
    model.eval()
    pad = encoder.tokenizer.pad_token_id
    total_loss, total, used = 0.0, 0, 0
    all_labels: list[int] = []
    all_predicted: list[int] = []
    for client in clients:
        examples = client.split(split)
        if not examples:
            continue
        encoded = encoder.encode_all(examples)
        losses, predicted = per_example(model, encoded, batch_size, pad, encoder.task)
        total_loss += sum(losses)
        all_predicted += predicted
        if predicted:
            all_labels += [int(item["labels"]) for item in encoded]
        total += len(losses)
        used += 1
    if total == 0:
        return {"eval_examples": 0, "eval_clients": 0}
    out = {"eval_loss": total_loss / total, "eval_examples": total, "eval_clients": used}
    if encoder.task == "classification":
        out["eval_accuracy"] = sum(y == p for y, p in zip(all_labels, all_predicted, strict=True)) / total
        out["eval_macro_f1"] = macro_f1(all_labels, all_predicted)
    else:
        out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    return out
