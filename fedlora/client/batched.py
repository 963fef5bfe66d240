"""Many clients in one pass (``compute.batch_clients``): K clients' local steps as one forward/backward.

In simulation every sampled client shares the same frozen base model W0; only its LoRA factors differ. So
step t of all K clients runs as one batch: the K clients' mini-batches are stacked (client k owns rows
k*b .. (k+1)*b - 1, padded to one length), and every target module computes

    y[k] = W0 x[k] + s_k B_k A_k dropout(x[k])          (x[k]: client k's rows; one bmm over k)

with A (K x r x d_in) and B (K x d_out x r) the clients' factors stacked, zero-padded to the largest rank r
(padded rows of A and columns of B start at zero, so their gradients are zero and they stay zero: a client
of rank r_k trains exactly its r_k x d_in and d_out x r_k factors). The loss is sum_k L_k, L_k the mean over
client k's target tokens, so d(sum_k L_k)/d(A_k, B_k) = dL_k/d(A_k, B_k): each client gets its own gradient.
Gradient clipping is per client (the norm over client k's slices of every stacked tensor), and one AdamW /
SGD over the stacked tensors equals K separate optimizers, because both are element-wise and every client
takes the same number of steps.

What it equals: the per-client path (:func:`fedlora.client.trainer.train_locally`) up to float32 rounding
(the padded length changes the matmul shapes), with ``adapter.dropout: 0``; with dropout the masks are other
draws of the same distribution. Under fp16 a non-finite gradient in any client skips that step for all.
Who it serves: first-order steps, no DP, causal LM, the same optimizer settings and step count, and hooks
that declare ``batchable`` (no loss term, no training phase of their own); :func:`batch_refusal` says why
not otherwise and the node trains those clients one by one.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from fedlora.adapters.lora import LoraAdapters
from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientContext, ClientHooks
from fedlora.client.loss import token_losses
from fedlora.client.round import close_round, frozen_by, open_round
from fedlora.client.settings import LocalTrainingSettings, round_settings
from fedlora.client.steps import (
    EIGHT_BIT_OPTIMIZERS,
    LocalResult,
    backward,
    gradient_norm_metrics,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    seeded,
    step_loss_metrics,
)
from fedlora.client.store import PersonalStore
from fedlora.client.trainer import FirstOrderSteps
from fedlora.compute import autocast, grad_scaler, model_device, to_device
from fedlora.data.encoding import EncodedOnDemand, Encoder, collate, steps_for
from fedlora.data.examples import ClientData


@dataclass
class BatchedJob:
    """One client's part of a batched round."""

    client: ClientData
    start_state: AdapterState
    settings: LocalTrainingSettings
    seed: int
    hooks: Sequence[ClientHooks]
    client_id: int


def batch_refusal(encoder: Encoder, jobs: Sequence[BatchedJob]) -> str | None:
    """Why these clients cannot train in one pass (None: they can)."""
    if encoder.task != "causal-lm":
        return "only causal-LM tasks are batched"
    first = jobs[0].settings
    if first.gradient_accumulation_steps > 1:
        return "gradient accumulation is per client"
    if first.optimizer in EIGHT_BIT_OPTIMIZERS:
        return (
            "8-bit optimizer state is quantised in blocks of each tensor, which stacked clients would share"
        )
    if encoder.packing:
        return "packed rows are per client"
    steps = {
        steps_for(len(j.client.train), first.batch_size, first.local_steps, first.local_epochs) for j in jobs
    }
    for job in jobs:
        if job.settings.privacy is not None:
            return "DP-SGD needs per-client Opacus steps"
        blocking = sorted({type(h).kind for h in job.hooks if not h.batchable})
        if blocking:
            return f"the method's client hooks ({', '.join(blocking)}) need their own training loop"
        if job.settings != first:  # one optimizer and one schedule serve all of them
            return "the clients' local-training settings differ"
    if len(steps) > 1:
        return "the clients take different numbers of local steps"
    return None


@dataclass
class _StackedModule:
    """One target module's factors for all K clients: A (K x r x d_in), B (K x d_out x r), scales (K)."""

    layer: LoraLayer
    a_key: str
    b_key: str
    A: torch.nn.Parameter
    B: torch.nn.Parameter
    scales: torch.Tensor


@contextlib.contextmanager
def _stacked_forward(adapters: LoraAdapters, modules: list[_StackedModule], dropout: float) -> Iterator[None]:
    """While active: the PEFT adapters are off and every target module adds s_k B_k A_k dropout(x[k])."""
    model = adapters.model
    assert model is not None

    def hook_for(stacked: _StackedModule):
        def hook(
            module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor:
            x = inputs[0]
            K = stacked.A.shape[0]
            xk = x.reshape(K, -1, x.shape[-1])
            if dropout and module.training:
                xk = F.dropout(xk, dropout, training=True)
            low = torch.bmm(xk, stacked.A.transpose(1, 2).to(xk.dtype))
            delta = torch.bmm(low, stacked.B.transpose(1, 2).to(low.dtype))
            delta = delta * stacked.scales.to(delta.dtype)[:, None, None]
            return output + delta.reshape(output.shape).to(output.dtype)

        return hook

    handles = [m.layer.get_base_layer().register_forward_hook(hook_for(m)) for m in modules]
    try:
        with model.disable_adapter():
            yield
    finally:
        for handle in handles:
            handle.remove()


def _stack(adapters: LoraAdapters, states: list[AdapterState], device: torch.device) -> list[_StackedModule]:
    """Zero-padded stacks of the clients' full states (each already validated by loading it)."""
    modules = []
    for layer, a_key, b_key in adapters.lora_modules().values():
        ranks = [state[a_key].shape[0] for state in states]
        r = max(ranks)
        K = len(states)
        d_in, d_out = states[0][a_key].shape[1], states[0][b_key].shape[0]
        A = torch.zeros(K, r, d_in, device=device)
        B = torch.zeros(K, d_out, r, device=device)
        for k, state in enumerate(states):
            A[k, : ranks[k]] = state[a_key]
            B[k, :, : ranks[k]] = state[b_key]
        scales = torch.tensor([adapters.scaling(rank) for rank in ranks], device=device)
        modules.append(
            _StackedModule(layer, a_key, b_key, torch.nn.Parameter(A), torch.nn.Parameter(B), scales)
        )
    return modules


def _dummy_item(pad_token_id: int) -> dict[str, Any]:
    """A filler row (a client whose batch is short): one attended token, no targets, no gradient."""
    return {"input_ids": [pad_token_id], "labels": [-100]}


def train_clients_together(
    adapters: LoraAdapters,
    encoder: Encoder,
    jobs: Sequence[BatchedJob],
    server_round: int,
    store: PersonalStore | None = None,
) -> list[LocalResult]:
    """The local rounds of ``jobs`` in one batched pass per step (see the module docstring); each client's
    hooks run in the one order of :mod:`fedlora.client.round` (``open_round`` ... ``close_round``)."""
    model = adapters.model
    assert model is not None
    device = model_device(model)
    dropout = adapters.cfg.dropout
    settings = round_settings(jobs[0].settings, server_round)
    pad = encoder.tokenizer.pad_token_id
    contexts: list[ClientContext] = []
    states: list[AdapterState] = []
    frozen_keys: set[str] = set()
    client_batches: list[list[list[dict[str, Any]]]] = []
    metrics: list[dict[str, Any]] = []
    for job in jobs:  # each client's start state, batches and hooks: steps 1-4 of the one order
        ctx = ClientContext(
            adapters=adapters,
            encoder=encoder,
            encoded=EncodedOnDemand(encoder, job.client.train),
            settings=settings,
            seed=job.seed,
            client_id=job.client_id,
            server_round=server_round,
            generator=torch.Generator().manual_seed(job.seed),
            store=store,
            data=job.client,
        )
        steps = FirstOrderSteps()
        metrics.append(open_round(ctx, job.start_state, job.hooks, steps))
        client_batches.append(steps.batches)
        states.append(adapters.state())
        frozen = frozen_by(job.hooks)
        frozen_keys |= {k for k in states[-1] if frozen(k)}
        contexts.append(ctx)
    if any(set(s) != set(states[0]) for s in states) or any(".lora_" not in k for k in states[0]):
        raise ValueError("batched clients need LoRA-only states with the same target modules")
    modules = _stack(adapters, states, device)
    params = [m.A for m in modules if m.a_key not in frozen_keys]
    params += [m.B for m in modules if m.b_key not in frozen_keys]
    for m in modules:
        m.A.requires_grad_(m.a_key not in frozen_keys)
        m.B.requires_grad_(m.b_key not in frozen_keys)
    optimizer = make_optimizer(params, settings)
    scheduler = make_scheduler(optimizer, settings, len(client_batches[0]))  # one schedule: equal steps
    scaler = grad_scaler(settings.precision, device)
    clip = functools.partial(per_client_gradient_norms, params, settings.grad_clip)
    K = len(jobs)
    rows = max(len(b) for batches in client_batches for b in batches)
    losses: list[list[float]] = [[] for _ in jobs]
    norms: list[torch.Tensor] = []  # (K,) per step
    tokens = [0] * K
    started = time.perf_counter()
    model.train()
    with (
        _stacked_forward(adapters, modules, dropout),
        seeded(jobs[0].seed, device),  # dropout masks (other draws than the per-client path's)
    ):
        for step in range(len(client_batches[0])):
            items: list[dict[str, Any]] = []
            for k, batches in enumerate(client_batches):
                batch = batches[step]
                tokens[k] += sum(len(item["input_ids"]) for item in batch)
                items += batch + [_dummy_item(pad)] * (rows - len(batch))
            stacked = to_device(collate(items, pad), device)
            with autocast(settings.precision, device):
                token_loss, row = token_losses(model, stacked)
                owner = row // rows
                per_client = torch.zeros(K, device=token_loss.device).index_add(0, owner, token_loss.float())
                counts = torch.bincount(owner, minlength=K).clamp(min=1)
                client_loss = per_client / counts
            total = client_loss.sum()
            for k, value in enumerate(client_loss.detach().cpu().tolist()):
                losses[k].append(value)
            backward(total, scaler)
            norms.append(optimizer_step(optimizer, scaler, clip, scheduler))
    model.eval()
    measured = norms and norms[0].numel() == K  # K x steps, one device sync
    client_norms = torch.stack(norms, dim=1).tolist() if measured else [[] for _ in jobs]
    seconds = (time.perf_counter() - started) / K
    results = []
    for k, (job, ctx) in enumerate(zip(jobs, contexts, strict=True)):
        state: AdapterState = {}
        for m in modules:
            r = states[k][m.a_key].shape[0]
            state[m.a_key] = m.A.detach()[k, :r].to("cpu", copy=True)
            state[m.b_key] = m.B.detach()[k, :, :r].to("cpu", copy=True)
        state = {key: state[key] for key in states[k] if key not in frozen_keys}
        found = metrics[k]
        found.update(
            {
                "train_loss": sum(losses[k]) / len(losses[k]),
                "steps": len(losses[k]),
                "tokens": tokens[k],
                "train_seconds": seconds,
                **step_loss_metrics(losses[k], 1, settings.lr),
                "batched_clients": K,
                **gradient_norm_metrics(client_norms[k]),
            }
        )
        results.append(close_round(ctx, state, job.hooks, found))
    return results


def per_client_gradient_norms(params: Sequence[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Each client's gradient norm ||g_k||_2 (its slice k of every stacked tensor, as one vector), shape (K,),
    measured before clipping; with ``max_norm``, each g_k is then clipped with torch's rule
    g_k *= min(1, max_norm / (||g_k|| + 1e-6)), as the per-client path clips its own gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([g.flatten(1).float().pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (K,)
    if max_norm is not None:
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.ndim - 1))).to(g.dtype))
    return norms
