"""Held-out loss: the model's mean loss on each client's examples, averaged over clients by examples.

Causal LM: an example's loss is the mean cross-entropy over its response tokens (labels != -100);
client loss = mean over its examples; the federation figure sum_c n_c loss_c / sum_c n_c equals the mean
over all examples. Perplexity = exp(loss). Classification adds accuracy (argmax of the logits).
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
) -> tuple[list[float], list[bool]]:
    """Per-example loss (and, for classification, whether the prediction is right)."""
    losses: list[float] = []
    correct: list[bool] = []
    for start in range(0, len(encoded), batch_size):
        batch_losses, batch_correct = example_losses(
            model, collate(encoded[start : start + batch_size], pad_token_id), task
        )
        losses += batch_losses.tolist()
        if batch_correct is not None:
            correct += batch_correct.tolist()
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
        losses, correct = per_example(model, encoder.encode_all(examples), batch_size, pad, encoder.task)
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
