"""Local training of one client in one round (first-order: AdamW or SGD, optional FedProx term).

Given the payload from the server (the adapter to start from) the client minimises its task loss over
``steps`` mini-batches; with ``prox_mu > 0`` it minimises

    L(theta) + mu / 2 * || theta - theta_global ||^2

where theta is the WHOLE trainable adapter flattened into one vector (not a sum of per-tensor norms).
Everything random in a round (batch order, dropout) derives from one seed per (run seed, round, client),
so a round replays identically after a resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedlora.adapters.lora import LoraAdapters
from fedlora.adapters.ranks import trailing_rank_norms, truncate_state
from fedlora.adapters.state import AdapterState, state_digest
from fedlora.client.loss import batch_loss, example_losses
from fedlora.client.privacy import (
    check_dp_support,
    dp_optimizer,
    per_example_gradients,
    poisson_batches,
    zero_grad_samples,
)
from fedlora.client.zeroth_order import train_zeroth_order
from fedlora.data.encoding import EncodedOnDemand, Encoder, batches_for_steps, collate, steps_for
from fedlora.data.examples import ClientData


@dataclass(frozen=True)
class LocalTrainingSettings:
    """Resolved local-training settings of one client for one round."""

    optimizer: str
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    local_steps: int | None = 10
    local_epochs: float | None = None
    batch_size: int = 4
    grad_clip: float | None = 1.0
    prox_mu: float = 0.0
    # HetLoRA self-pruning: penalty lambda * sum ||B[:, g:]|| ||A[g:, :]|| (g = floor(gamma r)), and
    # the mean of that product below prune_threshold after training -> reply at rank floor(gamma r).
    rank_penalty: float = 0.0
    rank_gamma: float = 0.99
    prune_threshold: float | None = None
    # FFA-LoRA: A stays as the seeded initialisation (not trained, not sent); the payloads hold B only.
    freeze_lora_a: bool = False
    frozen_a_digest: str | None = None  # the server's state_digest of A; a client with another A refuses
    # DP-SGD (fedlora.client.privacy): set per client by the engine from the config's privacy section.
    dp_noise_multiplier: float | None = None
    dp_max_grad_norm: float = 1.0
    dp_sampling: str = "poisson"
    dp_sample_rate: float | None = None
    # Zeroth-order (MeZO) local training (fedlora.client.zeroth_order); upload "weights" or "seeds".
    zeroth_order: bool = False
    zo_eps: float = 1e-3
    zo_perturbations: int = 1
    zo_upload: str = "weights"
    zo_full_model: bool = False  # every base weight instead of the adapter (the payloads are full models)
    # multiplies lr (FedMeZO's personalised client learning rates)
    lr_scale: float = 1.0
    # pFedLoRA: first train the local model's own weights with the adapter frozen, for this many steps
    local_model_steps: int = 0
    local_model_lr: float | None = None


@dataclass
class LocalResult:
    """What local training produced: the new adapter state and its numbers."""

    state: AdapterState
    num_examples: int
    metrics: dict[str, float]


def round_seed(run_seed: int, server_round: int, client_id: int) -> int:
    """A 63-bit seed that depends only on (run seed, round, client): sha256 of the three, truncated."""
    digest = hashlib.sha256(f"{run_seed}/{server_round}/{client_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """mu / 2 * ||theta - theta_global||_2^2 with theta the concatenation of all tensors (one vector)."""
    diff = torch.cat([(p - a).reshape(-1) for p, a in zip(params, anchor, strict=True)])
    return 0.5 * mu * diff.pow(2).sum()


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


def train_locally(
    adapters: LoraAdapters,
    encoder: Encoder,
    client: ClientData,
    start_state: AdapterState,
    settings: LocalTrainingSettings,
    seed: int,
) -> LocalResult:
    """Load ``start_state``, run the local steps, return the trained state and the mean training loss.

    With ``freeze_lora_a`` the LoRA A factors are neither trained nor returned (FFA-LoRA). With
    ``dp_noise_multiplier`` the steps are DP-SGD steps (:mod:`fedlora.client.privacy`): per-example loss and
    clipping, Gaussian noise, Poisson-sampled batches (or fixed-size ones with ``dp_sampling: shuffle``).
    """
    if settings.lr_scale != 1.0:
        settings = replace(settings, lr=settings.lr * settings.lr_scale, lr_scale=1.0)
    if settings.zeroth_order:
        return train_locally_zeroth_order(adapters, encoder, client, start_state, settings, seed)
    frozen = (lambda key: ".lora_A." in key) if settings.freeze_lora_a else (lambda key: False)
    adapters.load(start_state, partial=settings.freeze_lora_a)
    if settings.frozen_a_digest is not None:
        own_a = {k: v for k, v in adapters.state().items() if frozen(k)}
        if state_digest(own_a) != settings.frozen_a_digest:
            raise ValueError(
                "this client's frozen LoRA A differs from the server's (digest mismatch): the client must "
                "build its adapter with the run's adapter.init_seed, model and target modules"
            )
    model = adapters.model
    assert model is not None
    named = adapters.trainable_parameters()
    for key, param in named:
        param.requires_grad_(not frozen(key))
    params = [p for key, p in named if not frozen(key)]
    dp = settings.dp_noise_multiplier is not None
    if dp and (settings.prox_mu > 0 or settings.rank_penalty > 0):
        raise ValueError(
            "DP-SGD clips per-example gradients; a proximal or rank penalty term is not supported with it"
        )
    pad_token_id = encoder.tokenizer.pad_token_id
    anchor = [p.detach().clone() for p in params] if settings.prox_mu > 0 else []
    optimizer = make_optimizer(params, settings)
    encoded = EncodedOnDemand(encoder, client.train)
    steps = steps_for(len(encoded), settings.batch_size, settings.local_steps, settings.local_epochs)
    generator = torch.Generator().manual_seed(seed)
    if dp and settings.dp_sampling == "poisson":
        rate = settings.dp_sample_rate or min(1.0, settings.batch_size / len(encoded))
        batches = [[encoded[i] for i in idx] for idx in poisson_batches(len(encoded), rate, steps, generator)]
    else:
        batches = batches_for_steps(encoded, settings.batch_size, steps, generator)
    local_model_metrics = {}
    if settings.local_model_steps > 0:
        local_model_metrics = train_local_model(adapters, encoder, encoded, settings, generator, seed)
    hooks = contextlib.nullcontext()
    if dp:
        check_dp_support(model)
        optimizer = dp_optimizer(
            optimizer, settings.dp_noise_multiplier, settings.dp_max_grad_norm, settings.batch_size, seed
        )
        hooks = per_example_gradients(model)

    started = time.perf_counter()
    losses: list[float] = []
    tokens = 0
    model.train()
    with hooks, torch.random.fork_rng():
        torch.manual_seed(seed)  # dropout masks
        for batch_items in batches:
            if not batch_items:  # an empty Poisson batch: the noise still goes in
                zero_grad_samples(params)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                continue
            batch = collate(batch_items, pad_token_id)
            tokens += int(batch["attention_mask"].sum())
            if dp:  # each example's own loss, so that each per-example gradient is that example's
                loss = example_losses(model, batch, encoder.task)[0].mean()
            else:
                loss = batch_loss(model, batch, encoder.task)
            losses.append(float(loss.detach()))
            if settings.prox_mu > 0:
                loss = loss + proximal_term(params, anchor, settings.prox_mu)
            if settings.rank_penalty > 0:
                trailing = trailing_rank_norms(adapters.trainable_parameters(), settings.rank_gamma)
                loss = loss + settings.rank_penalty * trailing.sum()
            loss.backward()
            if settings.grad_clip is not None and not dp:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    metrics: dict[str, Any] = {
        "train_loss": sum(losses) / len(losses) if losses else float("nan"),
        "steps": len(batches),
        "tokens": tokens,
        "train_seconds": time.perf_counter() - started,
    }
    metrics.update(local_model_metrics)
    if dp:  # computed on raw private batches: not released (only the public step count leaves the client)
        metrics = {"steps": len(batches)}
    state = {k: v for k, v in adapters.state().items() if not frozen(k)}
    if settings.prune_threshold is not None:
        with torch.no_grad():
            trailing = float(trailing_rank_norms(list(state.items()), settings.rank_gamma).mean())
        metrics["trailing_rank_norm"] = trailing
        if trailing < settings.prune_threshold:
            profile = adapters.active_profile.pruned(settings.rank_gamma)
            state = truncate_state(state, profile, adapters.cfg.alpha)
    return LocalResult(state=state, num_examples=len(encoded), metrics=metrics)


def train_locally_zeroth_order(
    adapters: LoraAdapters,
    encoder: Encoder,
    client: ClientData,
    start_state: AdapterState,
    settings: LocalTrainingSettings,
    seed: int,
) -> LocalResult:
    """MeZO steps on the adapter (:mod:`fedlora.client.zeroth_order`): forward passes only, eval mode.

    Replies with the trained adapter (``zo_upload: weights``) or with the steps record
    (``zo_upload: seeds``: seeds, projected gradients and learning rates) that the server replays.
    """
    if settings.zo_full_model:
        adapters.load_base(start_state)
        named = adapters.base_parameters()
    else:
        adapters.load(start_state)
        named = adapters.trainable_parameters()
    model = adapters.model
    assert model is not None
    model.eval()
    encoded = EncodedOnDemand(encoder, client.train)
    steps = steps_for(len(encoded), settings.batch_size, settings.local_steps, settings.local_epochs)
    batches = batches_for_steps(encoded, settings.batch_size, steps, torch.Generator().manual_seed(seed))
    pad_token_id = encoder.tokenizer.pad_token_id
    tokens = 0

    def loss_of(items: list[dict[str, Any]]) -> Callable[[], float]:
        batch = collate(items, pad_token_id)

        def loss() -> float:
            with torch.no_grad():
                return float(batch_loss(model, batch, encoder.task))

        return loss

    for items in batches:
        tokens += sum(len(item["input_ids"]) for item in items)
    record, metrics = train_zeroth_order(
        named,
        [loss_of(items) for items in batches],
        seed,
        settings.zo_eps,
        settings.lr,
        settings.weight_decay,
        settings.zo_perturbations,
    )
    metrics["tokens"] = tokens
    if settings.zo_upload == "seeds":
        state = record
    else:
        state = {k: p.detach().clone() for k, p in named} if settings.zo_full_model else adapters.state()
    return LocalResult(state=state, num_examples=len(encoded), metrics=metrics)


def train_local_model(
    adapters: LoraAdapters,
    encoder: Encoder,
    encoded: EncodedOnDemand,
    settings: LocalTrainingSettings,
    generator: torch.Generator,
    seed: int,
) -> dict[str, float]:
    """pFedLoRA's first phase: the adapter frozen, the local model's own weights trained (AdamW).

    Afterwards the local weights are frozen again and the adapter trainable, for the second phase.
    """
    model = adapters.model
    assert model is not None
    adapter_params = [p for _, p in adapters.trainable_parameters()]
    local = [p for _, p in adapters.base_parameters()]
    for p in adapter_params:
        p.requires_grad_(False)
    for p in local:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        local, lr=settings.local_model_lr or settings.lr, weight_decay=settings.weight_decay
    )
    batches = batches_for_steps(encoded, settings.batch_size, settings.local_model_steps, generator)
    started = time.perf_counter()
    losses = []
    model.train()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed ^ 0x10CA1)
            for items in batches:
                loss = batch_loss(model, collate(items, encoder.tokenizer.pad_token_id), encoder.task)
                losses.append(float(loss.detach()))
                loss.backward()
                if settings.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(local, settings.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        for p in local:
            p.requires_grad_(False)
        for p in adapter_params:
            p.requires_grad_(True)
    return {
        "local_model_loss": sum(losses) / len(losses),
        "local_model_seconds": time.perf_counter() - started,
    }
