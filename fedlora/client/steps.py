"""First-order step machinery shared by the one-client trainer and the batched trainer: optimizer and
schedule from the settings, the step loop (gradient accumulation, clipping, mixed precision), and the seed
of a client's round."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.adapters.state import AdapterState
from fedlora.client.settings import (
    LocalTrainingSettings,
)
from fedlora.compute import autocast, grad_scaler, model_device


@dataclass
class LocalResult:
    """What local training produced: the state to send back and its numbers."""

    state: AdapterState
    num_examples: int
    metrics: dict[str, float]


def round_seed(run_seed: int, server_round: int, client_id: int) -> int:
    """A 63-bit seed that depends only on (run seed, round, client): sha256 of the three, truncated."""
    digest = hashlib.sha256(f"{run_seed}/{server_round}/{client_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


#: ``client.optimizer`` names (TRL / transformers' ``optim`` names where they exist) -> how to build it
OPTIMIZERS = ("adamw", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd")
#: optimizers whose state is quantised block-wise over each tensor (bitsandbytes)
EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")


def make_optimizer(params: Sequence[torch.Tensor], settings: LocalTrainingSettings) -> torch.optim.Optimizer:
    """The local optimizer: ``adamw`` / ``adamw_torch`` (torch's AdamW), ``adamw_torch_fused`` (its fused
    kernel, the same update), ``adamw_8bit`` / ``paged_adamw_8bit`` (bitsandbytes' AdamW with 8-bit
    block-wise state, paged on CUDA; tensors under 4,096 elements keep 32-bit state, bitsandbytes' rule),
    ``sgd`` (with ``momentum``). Weight decay is AdamW's decoupled decay or SGD's L2 term."""
    name, lr, decay = settings.optimizer, settings.lr, settings.weight_decay
    if name in ("adamw", "adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay, fused=name == "adamw_torch_fused" or None)
    if name in EIGHT_BIT_OPTIMIZERS:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError(
                f"client.optimizer {name!r} needs bitsandbytes: pip install 'fedlora[qlora]'"
            ) from None
        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=lr, weight_decay=decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=settings.momentum, weight_decay=decay)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def make_scheduler(optimizer: torch.optim.Optimizer, settings: LocalTrainingSettings, steps: int) -> Any:
    """The round's learning-rate schedule over its ``steps`` optimizer steps (``transformers.get_scheduler``;
    warmup = ``warmup_steps`` or ceil(``warmup_ratio`` x steps)); None for a constant rate."""
    if settings.lr_scheduler == "constant":
        return None
    from transformers import get_scheduler

    warmup = settings.warmup_steps or math.ceil(settings.warmup_ratio * steps)
    return get_scheduler(
        settings.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max(steps, 1)
    )


#: who hears of each optimizer step of the main phase, as (steps done, steps in all): the in-process
#: transport's progress line within a long round (:func:`reporting_steps`); None = nobody
STEP_LISTENER: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "fedlora_step_listener", default=None
)


@contextlib.contextmanager
def reporting_steps(listener: Callable[[int, int], None]) -> Iterator[None]:
    """Within the block, ``listener(done, total)`` is called after each local optimizer step."""
    token = STEP_LISTENER.set(listener)
    try:
        yield
    finally:
        STEP_LISTENER.reset(token)


def run_steps(
    model: torch.nn.Module,
    params: Sequence[torch.Tensor],
    batches: list[list[dict[str, Any]]],
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    grad_clip: float | None,
    seed: int,
    make_batch: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    precision: str = "fp32",
    accumulation: int = 1,
    scheduler: Any = None,
) -> tuple[list[float], int, list[float]]:
    """Plain first-order steps (train mode, dropout seeded); returns the micro-batch losses, the token count and
    each optimizer step's global gradient norm before clipping (:func:`gradient_norm`).

    ``make_batch`` turns a micro-batch's encoded examples into tensors (``Encoder.training_batch``: padded or
    packed rows).
    Every ``accumulation`` consecutive micro-batches make one optimizer step on the mean of their losses
    (each backward gets loss / accumulation); ``scheduler`` steps after each optimizer step. The forward runs
    under ``precision``'s autocast on the model's device; with fp16 the loss is scaled before backward and the
    gradients unscaled before clipping (a step with inf/NaN gradients is skipped). Shared by the main phase
    and hooks that train something else first (pFedLoRA's local-model phase).
    """
    losses: list[float] = []
    norms: list[torch.Tensor] = []
    tokens = 0
    device = model_device(model)
    scaler = grad_scaler(precision, device)
    clip = functools.partial(gradient_norm, params, grad_clip)
    listener = STEP_LISTENER.get()
    total_steps = -(-len(batches) // accumulation)
    model.train()
    with seeded(seed, device):  # dropout masks
        for index, items in enumerate(batches, start=1):
            batch = make_batch(items)
            tokens += sum(len(item["input_ids"]) for item in items)
            with autocast(precision, device):
                loss = loss_of(batch)
            losses.append(float(loss.detach()))
            backward(loss / accumulation if accumulation > 1 else loss, scaler)
            if index % accumulation == 0 or index == len(batches):
                norms.append(optimizer_step(optimizer, scaler, clip, scheduler))
                if listener is not None:
                    listener(len(norms), total_steps)
    model.eval()
    return losses, tokens, torch.stack(norms).tolist() if norms else []  # one device sync, at the end


def step_loss_metrics(losses: Sequence[float], accumulation: int, lr: float) -> dict[str, Any]:
    """What a client reports of its steps beside the mean loss: ``step_losses``, each optimizer step's loss
    (the mean of its ``accumulation`` micro-batch losses), and ``learning_rate``, the round's rate ``lr``
    (the schedule's peak in the round). The server windows ``step_losses`` by ``output.logging_steps``."""
    steps = [losses[i : i + accumulation] for i in range(0, len(losses), accumulation)]
    return {"step_losses": [sum(s) / len(s) for s in steps], "learning_rate": lr}


def gradient_norm(params: Sequence[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The step's global gradient norm ||g||_2 over ``params`` (all gradients as one vector), measured before
    clipping; with ``max_norm``, g is then clipped with torch's rule g *= min(1, max_norm / (||g|| + 1e-6))."""
    if max_norm is None:
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def gradient_norm_metrics(norms: Sequence[float]) -> dict[str, float]:
    """``grad_norm`` (the mean over the round's optimizer steps of the pre-clipping gradient norm) and
    ``grad_norm_max``; steps with a non-finite norm (fp16 overflow: the step was skipped) are left out."""
    finite = [n for n in norms if math.isfinite(n)]
    if not finite:
        return {}
    return {"grad_norm": sum(finite) / len(finite), "grad_norm_max": max(finite)}


def backward(loss: torch.Tensor, scaler: Any) -> None:
    """loss.backward(), scaled first with an fp16 gradient ``scaler``."""
    (loss if scaler is None else scaler.scale(loss)).backward()


def optimizer_step(
    optimizer: torch.optim.Optimizer, scaler: Any, clip: Callable[[], Any] | None, scheduler: Any = None
) -> Any:
    """clip, step, advance the schedule, zero the gradients; returns what ``clip`` returned (the gradient norm
    before clipping, as a tensor: no device sync here). With an fp16 ``scaler``: gradients unscaled before
    ``clip``, the step skipped if any gradient is inf/NaN, then the scale updated."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = clip() if clip is not None else None
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Inside: the global generators seeded with ``seed`` (the CPU's and, on CUDA, the device's, where dropout
    masks are drawn); outside: their states as before."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def training(params: Sequence[torch.Tensor], others: Sequence[torch.Tensor]):
    """Make ``params`` trainable and ``others`` frozen for the duration, then swap back."""
    for p in others:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in others:
            p.requires_grad_(True)
