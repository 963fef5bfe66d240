"""Local training of one client in one round: first-order and DP-SGD steps (zeroth-order ones are in
:mod:`fedlora.client.zeroth_order`), run in the one hook order of :mod:`fedlora.client.round`.

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
from fedlora.client.round import LocalSteps, client_round
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
    step_loss_metrics,
)
from fedlora.client.store import PersonalStore
from fedlora.compute import autocast, model_device
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
    """One client's round from ``start_state`` (:func:`fedlora.client.round.client_round`): the method's hooks
    in their order around the round's kind of steps (:func:`local_steps_for`); what is sent back."""
    settings = round_settings(settings, server_round)
    ctx = ClientContext(
        adapters=adapters,
        encoder=encoder,
        encoded=EncodedOnDemand(encoder, client.train),
        settings=settings,
        seed=seed,
        client_id=client.client_id if client_id is None else client_id,
        server_round=server_round,
        generator=torch.Generator().manual_seed(seed),
        store=store,
        data=client,
    )
    return client_round(ctx, start_state, hooks, local_steps_for(hooks, settings))


def local_steps_for(hooks: Sequence[ClientHooks], settings: LocalTrainingSettings) -> LocalSteps:
    """The round's kind of steps: the one a hook asks for (zeroth-order), else DP-SGD with
    ``settings.privacy``, else first-order optimizer steps."""
    for hook in hooks:
        steps = hook.local_steps()
        if steps is not None:
            return steps
    return DPSGDSteps() if settings.privacy is not None else FirstOrderSteps()


class FirstOrderSteps:
    """``settings.local_steps`` optimizer steps (AdamW or SGD, a schedule, gradient accumulation) on the
    adapter's trainable tensors, each step's loss the task loss plus the hooks' ``extra_loss``."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.steps = 0

    def load(
        self, ctx: ClientContext, state: AdapterState, partial: bool, frozen: Callable[[str], bool]
    ) -> list[tuple[str, torch.Tensor]]:
        ctx.adapters.load(state, partial=partial)
        named = ctx.adapters.trainable_parameters()
        for key, param in named:
            param.requires_grad_(not frozen(key))
        return [(k, p) for k, p in named if not frozen(k)]

    def plan(self, ctx: ClientContext) -> None:
        settings = ctx.settings
        self.steps = steps_for(
            len(ctx.encoded), settings.batch_size, settings.local_steps, settings.local_epochs
        )
        micro = self.steps * settings.gradient_accumulation_steps  # optimizer steps of micro-batches
        self.batches = batches_for_steps(ctx.encoded, settings.batch_size, micro, ctx.generator)

    def loss(self, ctx: ClientContext, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task loss of ``batch``."""
        assert ctx.adapters.model is not None
        return batch_loss(ctx.adapters.model, batch, ctx.encoder.task)

    def loss_function(
        self, ctx: ClientContext, hooks: Sequence[ClientHooks]
    ) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """A step's loss: :meth:`loss` plus every hook's ``extra_loss``."""

        def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            loss = self.loss(ctx, batch)
            for hook in hooks:
                extra = hook.extra_loss(ctx)
                if extra is not None:
                    loss = loss + extra
            return loss

        return loss_of

    def run(self, ctx: ClientContext, hooks: Sequence[ClientHooks]) -> dict[str, Any]:
        settings, model = ctx.settings, ctx.adapters.model
        assert model is not None
        params = [
            p for _, p in ctx.trainable
        ]  # after the hooks: one may train tensors of its own (Fed-SB's R)
        optimizer = make_optimizer(params, settings)
        started = time.perf_counter()
        losses, tokens, norms = run_steps(
            model,
            params,
            self.batches,
            optimizer,
            self.loss_function(ctx, hooks),
            settings.grad_clip,
            ctx.seed,
            ctx.encoder.training_batch,
            settings.precision,
            settings.gradient_accumulation_steps,
            make_scheduler(optimizer, settings, self.steps),
        )
        return {
            "train_loss": sum(losses) / len(losses) if losses else float("nan"),
            "steps": self.steps,
            "tokens": tokens,
            "train_seconds": time.perf_counter() - started,
            **step_loss_metrics(losses, settings.gradient_accumulation_steps, settings.lr),
            **gradient_norm_metrics(norms),
        }

    def trained(self, ctx: ClientContext, frozen: Callable[[str], bool]) -> AdapterState:
        return {k: v for k, v in ctx.adapters.state().items() if not frozen(k)}

    def release(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return metrics


class DPSGDSteps(FirstOrderSteps):
    """DP-SGD steps (:mod:`fedlora.client.privacy`): Poisson-sampled batches (or fixed-size ones with
    ``sampling: shuffle``), per-example losses, clipping and Gaussian noise; only the public step count leaves
    the client (a loss or token count computed on raw private batches is not released)."""

    def plan(self, ctx: ClientContext) -> None:
        dp = ctx.settings.privacy
        assert dp is not None
        if dp.sampling != "poisson":
            super().plan(ctx)
            return
        settings, n = ctx.settings, len(ctx.encoded)
        self.steps = steps_for(n, settings.batch_size, settings.local_steps, settings.local_epochs)
        rate = dp.sample_rate or min(1.0, settings.batch_size / n)
        indices = poisson_batches(n, rate, self.steps, ctx.generator)
        self.batches = [[ctx.encoded[i] for i in idx] for idx in indices]

    def loss(self, ctx: ClientContext, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean of each example's own loss, so that each per-example gradient is that example's."""
        assert ctx.adapters.model is not None
        return example_losses(ctx.adapters.model, batch, ctx.encoder.task)[0].mean()

    def run(self, ctx: ClientContext, hooks: Sequence[ClientHooks]) -> dict[str, Any]:
        settings, model, dp = ctx.settings, ctx.adapters.model, ctx.settings.privacy
        assert model is not None and dp is not None
        params = [p for _, p in ctx.trainable]
        optimizer = make_optimizer(params, settings)
        run_dp_steps(
            model,
            params,
            self.batches,
            optimizer,
            self.loss_function(ctx, hooks),
            dp,
            settings.batch_size,
            ctx.seed,
            ctx.encoder.tokenizer.pad_token_id,
            settings.precision,
            make_scheduler(optimizer, settings, self.steps),
        )
        return {"steps": self.steps}

    def release(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"steps": self.steps}


def run_dp_steps(
    model: torch.nn.Module,
    params: Sequence[torch.Tensor],
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
