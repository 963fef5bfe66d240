"""Zeroth-order local training (MeZO: SPSA with the seed trick) at inference-level memory.

One step t on a batch, with the trainable tensors theta (in a fixed order) and n >= 1 perturbations:

    for j in 1..n:  s_tj = seed of (round seed, t, j);  z_j ~ N(0, I) regenerated from s_tj, never stored
                    theta += eps z_j;  L+ = loss;  theta -= 2 eps z_j;  L- = loss;  theta += eps z_j
                    g_tj = (L+ - L-) / (2 eps)                                   (projected gradient)
    theta -= lr_t * ( (1/n) sum_j g_tj z_j  +  wd * theta )   (no weight decay on biases and norms)

Forward passes only, in eval mode (no dropout), under ``torch.no_grad``: no activations, gradients or
optimizer state are kept. z_j is drawn tensor by tensor on the CPU from ``torch.Generator().manual_seed(s_tj)``
in a fixed tensor order (sorted by name), so a whole round is determined by (start adapter, [(s_tj, g_tj)], [lr_t]):
:func:`replay` reproduces the client's adapter bit for bit from those numbers (same platform), which lets a
client upload a few bytes per step instead of its adapter (FedKSeed's idea). The client and the server run
the very same :func:`perturb` / :func:`apply_update` code on tensors in the same order.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks
from fedlora.client.loss import batch_loss
from fedlora.client.steps import step_loss_metrics
from fedlora.compute import autocast, model_device, to_cpu, to_device
from fedlora.data.encoding import batches_for_steps, steps_for

SEEDS_KEY, GRADS_KEY, LRS_KEY, WEIGHT_DECAY_KEY = (
    "zo.seeds",
    "zo.projected_grads",
    "zo.lrs",
    "zo.weight_decay",
)


@register_client_hooks
class ZerothOrder(ClientHooks):
    """Zeroth-order local training instead of optimizer steps (the step kind any ZO method asks for).

    ``upload: seeds`` replies with the steps record (:func:`steps_record`) instead of the tensors;
    ``full_model`` tunes every base weight (the payloads are whole models) instead of the adapter.
    """

    kind = "zeroth-order"
    eps: float = Field(1e-3, gt=0.0)
    perturbations: int = Field(1, ge=1)
    upload: Literal["weights", "seeds"] = "weights"
    full_model: bool = False
    #: a step whose L+ or L- is not finite moves nothing (recorded with lr 0 and g 0), as FedKSeed's code does
    skip_nonfinite: bool = False
    replaces_optimizer: ClassVar[bool] = True

    def dp_refusal(self) -> str | None:
        return "zeroth-order steps have no DP-SGD mechanism (no per-example gradients to clip)"

    def step_seeds(self, round_seed: int, step: int) -> list[int]:
        """The seeds of step ``step``'s perturbations (default: fresh ones from the client's round seed)."""
        return [step_seed(round_seed, step, j) for j in range(self.perturbations)]

    def local_steps(self) -> ZerothOrderSteps:
        return ZerothOrderSteps(self)


def step_seed(round_seed: int, step: int, perturbation: int) -> int:
    """63-bit seed of perturbation j of step t, from the client's round seed."""
    digest = hashlib.sha256(f"{round_seed}/zo/{step}/{perturbation}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def decays(key: str) -> bool:
    """Weight decay applies to weights, not to biases and normalisation parameters."""
    lowered = key.lower()
    return not (lowered.endswith("bias") or "norm" in lowered)


@torch.no_grad()
def perturb(tensors: list[torch.Tensor], seed: int, scale: float) -> None:
    """theta += scale * z(seed), z drawn tensor by tensor in order from one seeded CPU generator (and then
    moved to the tensor's device, so the same seed gives the same z on every device)."""
    generator = torch.Generator().manual_seed(seed)
    for t in tensors:
        t.add_(torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device), alpha=scale)


@torch.no_grad()
def apply_update(
    named: list[tuple[str, torch.Tensor]],
    seeds: list[int],
    grads: list[float],
    lr: float,
    weight_decay: float,
) -> None:
    """theta -= lr * ((1/n) sum_j g_j z_j + wd * theta), regenerating each z_j in the perturbation order."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    n = len(seeds)
    for key, t in named:
        direction = torch.zeros_like(t)
        for generator, g in zip(generators, grads, strict=True):
            z = torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
            direction.add_(z, alpha=g / n)
        if weight_decay and decays(key):
            direction.add_(t, alpha=weight_decay)
        t.sub_(direction, alpha=lr)


def zo_step(
    named: list[tuple[str, torch.Tensor]],
    loss_fn: Callable[[], float],
    seeds: list[int],
    eps: float,
    lr: float,
    weight_decay: float,
    skip_nonfinite: bool = False,
) -> tuple[list[float], float]:
    """One MeZO step in place; returns the projected gradients g_j and the mean of L+ and L-. With
    ``skip_nonfinite``, a step with a non-finite loss is skipped: nothing moves, g_j = 0, the loss is NaN."""
    tensors = [t for _, t in named]
    grads, losses = [], []
    for seed in seeds:
        perturb(tensors, seed, eps)
        loss_plus = loss_fn()
        perturb(tensors, seed, -2 * eps)
        loss_minus = loss_fn()
        perturb(tensors, seed, eps)
        grads.append((loss_plus - loss_minus) / (2 * eps))
        losses += [loss_plus, loss_minus]
    if skip_nonfinite and not all(math.isfinite(loss) for loss in losses):
        return [0.0] * len(seeds), math.nan
    apply_update(named, seeds, grads, lr, weight_decay)
    return grads, sum(losses) / len(losses)


def replay(start: AdapterState, record: AdapterState, eps: float, weight_decay: float) -> AdapterState:
    """The adapter a client ends its round with, from its start adapter and its uploaded steps.

    ``record``: ``zo.seeds`` (int64, steps x n), ``zo.projected_grads`` (float64, steps x n), ``zo.lrs``
    (float64, steps). The same perturbation arithmetic as on the client, without the forward passes.
    """
    state = {k: v.clone() for k, v in start.items()}
    named = [(k, state[k]) for k in sorted(state)]
    tensors = [t for _, t in named]
    seeds, grads, lrs = record[SEEDS_KEY].tolist(), record[GRADS_KEY].tolist(), record[LRS_KEY].tolist()
    for step_seeds, step_grads, lr in zip(seeds, grads, lrs, strict=True):
        for seed in step_seeds:
            perturb(tensors, seed, eps)
            perturb(tensors, seed, -2 * eps)
            perturb(tensors, seed, eps)
        apply_update(named, step_seeds, step_grads, lr, weight_decay)
    return state


def steps_record(
    seeds: list[list[int]], grads: list[list[float]], lrs: list[float], weight_decay: float
) -> AdapterState:
    """The seed-based upload as tensors (safetensors on the wire)."""
    return {
        SEEDS_KEY: torch.tensor(seeds, dtype=torch.int64),
        GRADS_KEY: torch.tensor(grads, dtype=torch.float64),
        LRS_KEY: torch.tensor(lrs, dtype=torch.float64),
        WEIGHT_DECAY_KEY: torch.tensor(weight_decay, dtype=torch.float64),
    }


def check_steps_record(record: AdapterState, perturbations: int) -> str | None:
    """Why ``record`` is not a well-formed steps record of ``perturbations`` per step (None: it is): its four
    tensors, T x n seeds and projected gradients, T learning rates, all finite."""
    if set(record) != {SEEDS_KEY, GRADS_KEY, LRS_KEY, WEIGHT_DECAY_KEY}:
        return f"a seed-based reply needs {SEEDS_KEY}, {GRADS_KEY}, {LRS_KEY}, {WEIGHT_DECAY_KEY}; got {sorted(record)}"
    seeds, grads, lrs = record[SEEDS_KEY], record[GRADS_KEY], record[LRS_KEY]
    n = perturbations
    if seeds.ndim != 2 or seeds.shape[1] != n or grads.shape != seeds.shape or lrs.shape != (seeds.shape[0],):
        return f"step record shapes {tuple(seeds.shape)}, {tuple(grads.shape)}, {tuple(lrs.shape)} (expected T x {n})"
    if not (torch.isfinite(grads).all() and torch.isfinite(lrs).all()):
        return "non-finite projected gradients or learning rates"
    return None


def train_zeroth_order(
    named: Sequence[tuple[str, torch.Tensor]],
    batch_losses: list[Callable[[], float]],
    round_seed: int,
    eps: float,
    lr: float,
    weight_decay: float,
    perturbations: int,
    seeds_of: Callable[[int], list[int]] | None = None,
    skip_nonfinite: bool = False,
) -> tuple[AdapterState, dict[str, Any]]:
    """Run one MeZO step per batch loss function; returns the steps record and the metrics.

    ``named`` is put in the canonical order (sorted by name) that :func:`replay` uses too. ``seeds_of(step)``
    gives a step's perturbation seeds (default: :func:`step_seed` of the round seed; FedKSeed: from its pool).
    """
    named = sorted(named, key=lambda item: item[0])
    started = time.perf_counter()
    seeds, grads, lrs, losses = [], [], [], []
    for step, loss_fn in enumerate(batch_losses):
        step_seeds = (
            seeds_of(step)
            if seeds_of is not None
            else [step_seed(round_seed, step, j) for j in range(perturbations)]
        )
        g, loss = zo_step(named, loss_fn, step_seeds, eps, lr, weight_decay, skip_nonfinite)
        seeds.append(step_seeds)
        grads.append(g)
        lrs.append(lr if math.isfinite(loss) or not skip_nonfinite else 0.0)  # a skipped step: lr 0
        losses.append(loss)
    kept = [loss for loss in losses if math.isfinite(loss)] if skip_nonfinite else losses
    metrics = {
        **({"train_loss": sum(kept) / len(kept)} if kept else {}),
        "steps": len(losses),
        "skipped_steps": len(losses) - len(kept),
        "forward_passes": 2 * perturbations * len(losses),
        "train_seconds": time.perf_counter() - started,
        "lr": lr,
        **step_loss_metrics(kept, 1, lr),
    }
    return steps_record(seeds, grads, lrs, weight_decay), metrics


class ZerothOrderSteps:
    """MeZO steps on the adapter (or, ``full_model``, every base weight): forward passes only, eval mode.
    The reply is the trained tensors (``upload: weights``) or the steps record (``upload: seeds``: seeds,
    projected gradients and learning rates) that the server replays."""

    def __init__(self, zo: ZerothOrder) -> None:
        self.zo = zo
        self.named: list[tuple[str, torch.Tensor]] = []
        self.batches: list[list[dict[str, Any]]] = []
        self.record: AdapterState = {}

    def load(
        self, ctx: ClientContext, state: AdapterState, partial: bool, frozen: Callable[[str], bool]
    ) -> list[tuple[str, torch.Tensor]]:
        adapters = ctx.adapters
        if self.zo.full_model:
            adapters.load_base(state)
            named = adapters.base_parameters()
        else:
            adapters.load(state, partial=partial)
            named = adapters.trainable_parameters()
        self.named = [(k, p) for k, p in named if not frozen(k)]
        return self.named

    def plan(self, ctx: ClientContext) -> None:
        settings = ctx.settings
        steps = steps_for(len(ctx.encoded), settings.batch_size, settings.local_steps, settings.local_epochs)
        self.batches = batches_for_steps(ctx.encoded, settings.batch_size, steps, ctx.generator)

    def run(self, ctx: ClientContext, hooks: Sequence[ClientHooks]) -> dict[str, Any]:
        model, settings = ctx.adapters.model, ctx.settings
        assert model is not None
        model.eval()
        device, precision, task = model_device(model), settings.precision, ctx.encoder.task

        def loss_of(items: list[dict[str, Any]]) -> Callable[[], float]:
            batch = to_device(ctx.encoder.training_batch(items), device)

            def loss() -> float:
                with torch.no_grad(), autocast(precision, device):
                    return float(batch_loss(model, batch, task))

            return loss

        self.record, metrics = train_zeroth_order(
            ctx.trainable,
            [loss_of(items) for items in self.batches],
            ctx.seed,
            self.zo.eps,
            settings.lr,
            settings.weight_decay,
            self.zo.perturbations,
            seeds_of=lambda step: self.zo.step_seeds(ctx.seed, step),
            skip_nonfinite=self.zo.skip_nonfinite,
        )
        metrics["tokens"] = sum(len(item["input_ids"]) for items in self.batches for item in items)
        return metrics

    def trained(self, ctx: ClientContext, frozen: Callable[[str], bool]) -> AdapterState:
        if self.zo.upload == "seeds":
            return self.record
        if self.zo.full_model:
            return to_cpu(dict(self.named))
        return {k: v for k, v in ctx.adapters.state().items() if not frozen(k)}

    def release(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return metrics
