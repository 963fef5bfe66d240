"""Held-out loss: the model's mean loss on each client's examples, averaged over clients by examples.

Causal LM: an example's loss is the mean cross-entropy over its response tokens (labels != -100);
client loss = mean over its examples; the federation figure sum_c n_c loss_c / sum_c n_c equals the mean
over all examples. Perplexity = exp(loss). Classification adds accuracy (argmax of the logits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedlora.data.encoding import Encoder, collate
from fedlora.data.examples import ClientData


@torch.no_grad()
def example_losses(
    model: torch.nn.Module, encoded: list[dict], batch_size: int, pad_token_id: int, task: str
) -> tuple[list[float], list[bool]]:
    """Per-example loss (and, for classification, whether the prediction is right)."""
    losses: list[float] = []
    correct: list[bool] = []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad_token_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if task == "classification":
            losses += F.cross_entropy(logits, labels, reduction="none").tolist()
            correct += (logits.argmax(-1) == labels).tolist()
            continue
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        token_loss = F.cross_entropy(
            shift_logits.transpose(1, 2), shift_labels, reduction="none", ignore_index=-100
        )
        counts = (shift_labels != -100).sum(1).clamp(min=1)
        losses += (token_loss.sum(1) / counts).tolist()
    return losses, correct


def evaluate_loss(
    model: torch.nn.Module, encoder: Encoder, clients: list[ClientData], split: str, batch_size: int
) -> dict[str, float]:
    """``eval_loss`` (+ ``eval_perplexity`` or ``eval_accuracy``), ``eval_examples``, ``eval_clients``."""
    model.eval()
    pad = encoder.tokenizer.pad_token_id
    total_loss, total_correct, total, used = 0.0, 0, 0, 0
    for client in clients:
        examples = client.split(split)
        if not examples:
            continue
        losses, correct = example_losses(model, encoder.encode_all(examples), batch_size, pad, encoder.task)
        total_loss += sum(losses)
        total_correct += sum(correct)
        total += len(losses)
        used += 1
    if total == 0:
        return {"eval_examples": 0, "eval_clients": 0}
    out = {"eval_loss": total_loss / total, "eval_examples": total, "eval_clients": used}
    if encoder.task == "classification":
        out["eval_accuracy"] = total_correct / total
    else:
        out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    return out
