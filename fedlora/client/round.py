"""One client round: the order of a method's client hooks, written once, around pluggable local steps.

Every way a client trains (first-order optimizer steps, DP-SGD steps, zeroth-order steps, or many clients in
one batched pass) runs the same order, each step with the round's :class:`ClientContext`:

1. ``hook.start_state(ctx, payload)`` for each hook: the adapter to start from (FedKSeed rebuilds it from
   seed coefficients, Fed-SB takes its latent matrices out);
2. the steps load it into the model (``partial_payload``: the rest stays as the client has it) and name the
   tensors they may train; those a hook freezes (``hook.frozen(key)``) are neither trained nor sent back;
   ``ctx.trainable`` is what remains;
3. the steps draw the round's batches (from ``ctx.generator``, before any hook draws from it);
4. ``hook.before_training(ctx)`` for each hook: verify a digest, load personal state, a local-model phase;
   its metrics are reported;
5. the steps run, adding each hook's ``extra_loss(ctx)`` to every step's loss (first-order steps);
6. the steps decide which metrics leave the client (DP-SGD: only the public step count);
7. the trained tensors minus the frozen ones, then ``hook.reply_state(ctx, state, metrics)`` for each hook:
   what is sent back (HetLoRA's pruned rank, FedSA-LoRA's B kept at home).

A hook chooses its kind of steps with :meth:`ClientHooks.local_steps` (zeroth-order); otherwise the settings do
(``privacy``: DP-SGD, else first-order). :func:`client_round` is the whole round; the batched pass
(:mod:`fedlora.client.batched`) runs steps 1-4 and 7 for each of its clients through :func:`open_round` and
:func:`close_round`, and step 5 for all of them at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientContext, ClientHooks, Frozen, LocalSteps

if TYPE_CHECKING:
    from fedlora.client.steps import LocalResult


def frozen_by(hooks: Sequence[ClientHooks]) -> Frozen:
    """Whether one of ``hooks`` freezes a tensor (neither trained nor sent back)."""
    return lambda key: any(h.frozen(key) for h in hooks)


def open_round(
    ctx: ClientContext, payload: AdapterState, hooks: Sequence[ClientHooks], steps: LocalSteps
) -> dict[str, Any]:
    """Steps 1-4 of the order (module docstring); returns the hooks' ``before_training`` metrics."""
    state = payload
    for hook in hooks:
        state = hook.start_state(ctx, state)
    ctx.trainable = steps.load(ctx, state, any(h.partial_payload for h in hooks), frozen_by(hooks))
    steps.plan(ctx)
    metrics: dict[str, Any] = {}
    for hook in hooks:
        metrics.update(hook.before_training(ctx))
    return metrics


def close_round(
    ctx: ClientContext, state: AdapterState, hooks: Sequence[ClientHooks], metrics: dict[str, Any]
) -> LocalResult:
    """Step 7 of the order: the hooks' ``reply_state`` over the trained state; what the client sends back."""
    from fedlora.client.steps import LocalResult

    for hook in hooks:
        state = hook.reply_state(ctx, state, metrics)
    return LocalResult(state=state, num_examples=len(ctx.encoded), metrics=metrics)


def client_round(
    ctx: ClientContext, payload: AdapterState, hooks: Sequence[ClientHooks], steps: LocalSteps
) -> LocalResult:
    """One client's whole round in the order of the module docstring."""
    metrics = open_round(ctx, payload, hooks, steps)
    metrics.update(steps.run(ctx, hooks))
    metrics = steps.release(metrics)
    return close_round(ctx, steps.trained(ctx, frozen_by(hooks)), hooks, metrics)
