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

import time
from collections.abc import Callable, Sequence
from typing import Any

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
from fedlora.client.settings import (
    DPSettings,
    LocalTrainingSettings,
    round_settings,
)
from fedlora.client.steps import (
    LocalResult,
    gradient_norm_metrics,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    run_steps,
    seeded,
)
from fedlora.client.store import PersonalStore
from fedlora.client.zeroth_order import ZerothOrder, train_zeroth_order
from fedlora.compute import autocast, model_device, to_cpu, to_device
from fedlora.data.encoding import EncodedOnDemand, Encoder, batches_for_steps, collate, steps_for
from fedlora.data.examples import ClientData


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
        skip_nonfinite=zo.skip_nonfinite,
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
