"""Losses for training and evaluation, with the output head applied only where a loss is taken.

Causal LM, response-only loss: with hidden states h (batch x seq x hidden) from the model body and labels y,

    loss = mean over {(b, t) : y[b, t+1] != -100} of CE(head(h[b, t]), y[b, t+1])

which is exactly Hugging Face's shifted causal-LM loss, but the head (hidden x vocab: 21% of SmolLM2's
forward FLOPs, and its logits are the largest activation) runs only on the target positions instead of all
of them. A model class whose logits are not plainly ``head(h)`` (logit soft-capping or scaling) would
differ, so the first batch of each model class is computed both ways; if they disagree, that class uses the
standard path from then on. Under bf16/fp16 autocast the head still runs at the model's own precision
(float32 for a float32 model): rounding the logits to bf16 would shift the cross-entropy by ~0.1 nats.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from fedlora.compute import model_device, to_device

log = logging.getLogger(__name__)

#: model class -> whether head-on-targets agrees with the model's own logits (checked once per class)
_FAST_PATH_AGREES: dict[type, bool] = {}


def _causal_lm(model: torch.nn.Module) -> Any:  # a transformers *ForCausalLM: its methods are not Module's
    """The transformers ``*ForCausalLM`` under a PEFT wrapper (or the model itself)."""
    base_of = getattr(model, "get_base_model", None)  # PEFT's wrapper
    return base_of() if base_of is not None else model


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes from a batch: ids, the (2-D padding or 4-D packed) attention mask, and
    position ids when the batch is packed."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def _fast_token_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    lm = _causal_lm(model)
    hidden = lm.base_model(**model_inputs(batch)).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    head = lm.get_output_embeddings()
    selected = hidden[:, :-1][mask]
    with torch.autocast(selected.device.type, enabled=False):  # logits at the head's own precision
        logits = head(selected.to(head.weight.dtype)).float()
    return F.cross_entropy(logits, targets[mask], reduction="none"), mask.nonzero()[:, 0]


def _standard_token_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(**model_inputs(batch)).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    return F.cross_entropy(logits[mask].float(), targets[mask], reduction="none"), mask.nonzero()[:, 0]


@torch.no_grad()
def _fast_path_agrees(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    was_training = model.training
    model.eval()  # no dropout, so both paths see the same network
    device = batch["input_ids"].device.type
    with torch.autocast(device, enabled=False):  # compare the paths themselves, at full precision
        fast, _ = _fast_token_losses(model, batch)
        standard, _ = _standard_token_losses(model, batch)
    model.train(was_training)
    agrees = bool(torch.allclose(fast, standard, rtol=1e-4, atol=1e-4))
    if not agrees:
        log.warning(
            "%s: head-on-targets loss differs from the model's logits; using the standard path",
            type(_causal_lm(model)).__name__,
        )
    return agrees


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every target token (labels != -100, shifted) and the batch row it belongs to."""
    kind = type(_causal_lm(model))
    if kind not in _FAST_PATH_AGREES:
        _FAST_PATH_AGREES[kind] = _fast_path_agrees(model, batch)
    if _FAST_PATH_AGREES[kind]:
        return _fast_token_losses(model, batch)
    return _standard_token_losses(model, batch)


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Training loss: mean over the batch's target tokens (causal LM) or examples (classification).
    The batch moves to the model's device first."""
    batch = to_device(batch, model_device(model))
    if task == "classification":
        return model(**batch).loss
    losses, _ = token_losses(model, batch)
    return losses.mean()


def example_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row: the mean loss over its target tokens (or its CE), and for classification the predicted class."""
    batch = to_device(batch, model_device(model))
    if task == "classification":
        labels = batch["labels"]
        logits = model(**model_inputs(batch)).logits.float()
        return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(-1)
    losses, rows = token_losses(model, batch)
    n = batch["input_ids"].shape[0]
    sums = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add_(0, rows, losses)
    counts = torch.zeros_like(sums).index_add_(0, rows, torch.ones_like(losses)).clamp(min=1)
    return sums / counts, None
