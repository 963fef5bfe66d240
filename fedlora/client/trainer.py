"""Local training of one client in one round: generic first-order, DP-SGD and zeroth-order steps.

Given the payload from the server (the adapter to start from) the client minimises its task loss over
``steps`` mini-batches with AdamW or SGD (``settings.optimizer``), plus whatever its method's hooks add
(:mod:`fedlora.client.hooks`: a loss term, a phase before training, what is sent back). This module knows
no method: FedProx's term, HetLoRA's pruning, FFA-LoRA's frozen A, pFedLoRA's local-model phase and FedMeZO's
zeroth-order steps all arrive as hook objects.

With ``settings.privacy`` the steps are DP-SGD steps (:mod:`fedlora.client.privacy`): per-example loss and
clipping, Gaussian noise, Poisson-sampled batches (or fixed-size ones with ``sampling: shuffle``); then only
the public step count is reported (no loss or token counts computed on raw private batches).

Everything random in a round (batch order, dropout, noise) derives from one seed per (run seed, round,
client), so a round replays identically after a resume.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from fedlora.adapters.lora import LoraAdapters
from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientContext, ClientHooks
from fedlora.client.loss import batch_loss, example_losses
from fedlora.client.privacy import (
    check_dp_support,
    dp_optimizer,
    per_example_gradients,
    poisson_batches,
    zero_grad_samples,
)
from fedlora.client.store import PersonalStore
from fedlora.client.zeroth_order import ZerothOrder, train_zeroth_order
from fedlora.compute import autocast, grad_scaler, model_device, to_cpu, to_device
from fedlora.data.encoding import EncodedOnDemand, Encoder, batches_for_steps, collate, steps_for
from fedlora.data.examples import ClientData


@dataclass(frozen=True)
class DPSettings:
    """One client's DP-SGD plan for a round (set by the privacy wrapper from its ledger)."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    sampling: Literal["poisson", "shuffle"] = "poisson"
    sample_rate: float | None = None


@dataclass(frozen=True)
class LocalTrainingSettings:
    """Resolved generic local-training settings of one client for one round (no method-specific fields)."""

    optimizer: str
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    local_steps: int | None = 10
    local_epochs: float | None = None
    batch_size: int = 4
    grad_clip: float | None = 1.0
    #: multiplies lr (e.g. FedMeZO's personalised client learning rates, relative spread)
    lr_scale: float = 1.0
    #: added to the round's lr (e.g. FedMeZO's personalised client learning rates, absolute spread)
    lr_offset: float = 0.0
    privacy: DPSettings | None = None
    #: autocast of the forward pass (``compute.precision``): fp32, bf16 or fp16 (with a gradient scaler)
    precision: str = "fp32"
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    #: round t trains at lr * lr_decay^(t - 1)
    lr_decay: float = 1.0
    gradient_accumulation_steps: int = 1


#: the generic settings a strategy may override per client in ``ClientInstruction.settings``
OVERRIDABLE = ("optimizer", "lr", "weight_decay", "momentum", "local_steps", "local_epochs", "batch_size")
OVERRIDABLE += ("grad_clip", "lr_scale", "lr_offset")


@dataclass
class LocalResult:
    """What local training produced: the state to send back and its numbers."""

    state: AdapterState
    num_examples: int
    metrics: dict[str, float]


def round_settings(settings: LocalTrainingSettings, server_round: int) -> LocalTrainingSettings:
    """The round's learning rate folded in: lr * lr_scale * lr_decay^(round - 1) + lr_offset."""
    factor = settings.lr_scale * settings.lr_decay ** max(server_round - 1, 0)
    if factor == 1.0 and settings.lr_offset == 0.0:
        return settings
    lr = settings.lr * factor + settings.lr_offset
    if lr <= 0:
        raise ValueError(
            f"round {server_round}: learning rate {settings.lr:g} x {factor:g} + offset {settings.lr_offset:g}"
            f" = {lr:g} <= 0; lower the strategy's learning-rate spread (e.g. strategy.options.lr_delta)"
        )
    return replace(settings, lr=lr, lr_scale=1.0, lr_decay=1.0, lr_offset=0.0)


def round_seed(run_seed: int, server_round: int, client_id: int) -> int:
    """A 63-bit seed that depends only on (run seed, round, client): sha256 of the three, truncated."""
    digest = hashlib.sha256(f"{run_seed}/{server_round}/{client_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_optimizer(
    params: list[torch.nn.Parameter], settings: LocalTrainingSettings
) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; allowed: adamw, sgd")


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


def run_steps(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
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
    model.eval()
    return losses, tokens, torch.stack(norms).tolist() if norms else []  # one device sync, at the end


def gradient_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
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


def train_locally(
    adapters: LoraAdapters,
    encoder: Encoder,
    client: ClientData,
    start_state: AdapterState,
    settings: LocalTrainingSettings,
    seed: int,
    hooks: Sequence[ClientHooks] = (),
    *,
    client_id: int | None = None,
    server_round: int = 0,
    store: PersonalStore | None = None,
) -> LocalResult:
    """Load ``start_state``, run the method's hooks around the local steps, return what is sent back."""
    settings = round_settings(settings, server_round)
    encoded = EncodedOnDemand(encoder, client.train)
    ctx = ClientContext(
        adapters=adapters,
        encoder=encoder,
        encoded=encoded,
        settings=settings,
        seed=seed,
        client_id=client.client_id if client_id is None else client_id,
        server_round=server_round,
        generator=torch.Generator().manual_seed(seed),
        store=store,
        data=client,
    )
    for hook in hooks:
        start_state = hook.start_state(ctx, start_state)
    zeroth = [h for h in hooks if isinstance(h, ZerothOrder)]
    if zeroth:
        return train_locally_zeroth_order(ctx, start_state, zeroth[0], hooks)
    frozen = lambda key: any(h.frozen(key) for h in hooks)  # noqa: E731
    adapters.load(start_state, partial=any(h.partial_payload for h in hooks))
    model = adapters.model
    assert model is not None
    named = adapters.trainable_parameters()
    for key, param in named:
        param.requires_grad_(not frozen(key))
    ctx.trainable = [(k, p) for k, p in named if not frozen(k)]
    dp = settings.privacy
    steps = steps_for(len(encoded), settings.batch_size, settings.local_steps, settings.local_epochs)
    if dp is not None and dp.sampling == "poisson":
        rate = dp.sample_rate or min(1.0, settings.batch_size / len(encoded))
        indices = poisson_batches(len(encoded), rate, steps, ctx.generator)
        batches = [[encoded[i] for i in idx] for idx in indices]
    else:  # `steps` optimizer steps of gradient_accumulation_steps micro-batches each
        micro = steps * settings.gradient_accumulation_steps
        batches = batches_for_steps(encoded, settings.batch_size, micro, ctx.generator)
    metrics: dict[str, Any] = {}
    for hook in hooks:
        metrics.update(hook.before_training(ctx))
    params = [p for _, p in ctx.trainable]  # after the hooks: one may train tensors of its own (Fed-SB's R)
    optimizer = make_optimizer(params, settings)
    started = time.perf_counter()

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if dp is not None:  # each example's own loss, so that each per-example gradient is that example's
            loss = example_losses(model, batch, encoder.task)[0].mean()
        else:
            loss = batch_loss(model, batch, encoder.task)
        for hook in hooks:
            extra = hook.extra_loss(ctx)
            if extra is not None:
                loss = loss + extra
        return loss

    norms: list[float] = []
    if dp is None:
        losses, tokens, norms = run_steps(
            model,
            params,
            batches,
            optimizer,
            loss_of,
            settings.grad_clip,
            seed,
            encoder.training_batch,
            settings.precision,
            settings.gradient_accumulation_steps,
            make_scheduler(optimizer, settings, steps),
        )
    else:
        pad = encoder.tokenizer.pad_token_id
        schedule = make_scheduler(optimizer, settings, steps)
        run_dp_steps(
            model,
            params,
            batches,
            optimizer,
            loss_of,
            dp,
            settings.batch_size,
            seed,
            pad,
            settings.precision,
            schedule,
        )
        losses, tokens = [], 0
    metrics.update(
        {
            "train_loss": sum(losses) / len(losses) if losses else float("nan"),
            "steps": steps,
            "tokens": tokens,
            "train_seconds": time.perf_counter() - started,
            **gradient_norm_metrics(norms),
        }
    )
    if dp is not None:  # computed on raw private batches: not released (only the public step count leaves)
        metrics = {"steps": steps}
    state = {k: v for k, v in adapters.state().items() if not frozen(k)}
    for hook in hooks:
        state = hook.reply_state(ctx, state, metrics)
    return LocalResult(state=state, num_examples=len(encoded), metrics=metrics)


def run_dp_steps(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batches: list[list[dict[str, Any]]],
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    dp: DPSettings,
    batch_size: int,
    seed: int,
    pad_token_id: int,
    precision: str = "fp32",
    scheduler: Any = None,
) -> None:
    """DP-SGD steps through Opacus: per-example gradients, clipping to C, Gaussian noise sigma C (drawn on
    the parameters' device). The forward runs under ``precision``'s autocast; per-example gradients, their
    clipping and the noise are float32 (the LoRA factors are)."""
    check_dp_support(model)
    device = model_device(model)
    optimizer = dp_optimizer(optimizer, dp.noise_multiplier, dp.max_grad_norm, batch_size, seed, device)
    hooks = per_example_gradients(model)
    model.train()
    with hooks, seeded(seed, device):  # dropout masks
        for items in batches:
            if not items:  # an empty Poisson batch: the noise still goes in
                zero_grad_samples(params)
            else:
                with autocast(precision, device):
                    loss = loss_of(collate(items, pad_token_id))
                loss.backward()
            optimizer_step(optimizer, None, None, scheduler)  # Opacus clips per example inside its step
    model.eval()


def train_locally_zeroth_order(
    ctx: ClientContext, start_state: AdapterState, zo: ZerothOrder, hooks: Sequence[ClientHooks]
) -> LocalResult:
    """MeZO steps on the adapter (or every base weight) (:mod:`fedlora.client.zeroth_order`): forward passes
    only, eval mode. Replies with the trained tensors (``upload: weights``) or with the steps record
    (``upload: seeds``: seeds, projected gradients and learning rates) that the server replays."""
    adapters, settings = ctx.adapters, ctx.settings
    if zo.full_model:
        adapters.load_base(start_state)
        named = adapters.base_parameters()
    else:
        adapters.load(start_state)
        named = adapters.trainable_parameters()
    model = adapters.model
    assert model is not None
    model.eval()
    steps = steps_for(len(ctx.encoded), settings.batch_size, settings.local_steps, settings.local_epochs)
    batches = batches_for_steps(ctx.encoded, settings.batch_size, steps, ctx.generator)
    task = ctx.encoder.task

    device, precision = model_device(model), settings.precision

    def loss_of(items: list[dict[str, Any]]) -> Callable[[], float]:
        batch = to_device(ctx.encoder.training_batch(items), device)

        def loss() -> float:
            with torch.no_grad(), autocast(precision, device):
                return float(batch_loss(model, batch, task))

        return loss

    tokens = sum(len(item["input_ids"]) for items in batches for item in items)
    record, metrics = train_zeroth_order(
        named,
        [loss_of(items) for items in batches],
        ctx.seed,
        zo.eps,
        settings.lr,
        settings.weight_decay,
        zo.perturbations,
        seeds_of=lambda step: zo.step_seeds(ctx.seed, step),
    )
    metrics["tokens"] = tokens
    if zo.upload == "seeds":
        state = record
    elif zo.full_model:
        state = to_cpu(dict(named))
    else:
        state = adapters.state()
    for hook in hooks:
        state = hook.reply_state(ctx, state, metrics)
    return LocalResult(state=state, num_examples=len(ctx.encoded), metrics=metrics)


@contextlib.contextmanager
def training(params: list[torch.nn.Parameter], others: list[torch.nn.Parameter]):
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
