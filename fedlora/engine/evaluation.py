"""Evaluating a global (or personal) state on the simulation's model: the shared-model protocol and the
personalised one (each client's own model), and the kept generations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedlora.adapters.state import AdapterState
from fedlora.compute import autocast, model_device
from fedlora.data.encoding import Encoder
from fedlora.data.examples import ClientData
from fedlora.engine.transport import Simulation
from fedlora.eval.registry import run_evaluators
from fedlora.models.personal import zero_adapter


def evaluate_state_load(sim: Simulation, state: AdapterState) -> None:
    """Put ``state`` into the shared model (a whole model's weights, or an adapter)."""
    if sim.adapters.is_full_state(state):
        sim.adapters.load_base(state)
    else:
        sim.adapters.load(state)


def evaluate_state(
    sim: Simulation,
    state: AdapterState,
    clients: list[ClientData],
    metrics: list[str] | None = None,
    predictions: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Load ``state`` into the shared model and run ``metrics`` (default ``eval.metrics``) on ``clients``
    (generation metrics append one record per example to ``predictions`` when given)."""
    evaluate_state_load(sim, state)
    assert sim.adapters.model is not None
    names = sim.plan.eval.metrics if metrics is None else metrics
    return evaluate_model(sim, sim.adapters.model, clients, names, predictions)


def evaluate_model(
    sim: Simulation,
    model: torch.nn.Module,
    clients: list[ClientData],
    names: list[str],
    predictions: list[dict[str, Any]] | None = None,
    encoder: Encoder | None = None,
) -> dict[str, float]:
    """``run_evaluators`` on ``model`` under the run's ``compute.precision`` (``encoder``: the model's own,
    default the run's)."""
    plan = sim.plan
    with autocast(plan.precision, model_device(model)):
        return run_evaluators(names, model, encoder or sim.encoder, clients, plan.eval, predictions)


def evaluate_personal(
    sim: Simulation, clients: list[ClientData], names: list[str], before_round: int
) -> dict[str, float]:
    """Personalised protocol: each client's own model (its newest weights from before ``before_round``)
    with the adapter the strategy gives it, on its own split; also without the adapter (B = 0).

    Returns the example-weighted figures (``eval_loss``, ``eval_accuracy``...), the mean and standard
    deviation over clients of the client figure (``eval_client_accuracy_mean`` / ``_std``, or loss), and
    the same without the adapter (``eval_accuracy_no_adapter``...).
    """
    import statistics

    assert sim.client_models is not None
    per_client: list[dict[str, float]] = []
    without: list[dict[str, float]] = []
    for client in clients:
        adapters, state = sim.client_models.install(
            client.client_id, before_round, sim.server.personal_state(client.client_id)
        )
        assert adapters.model is not None
        for adapter_state, bucket in ((state, per_client), (zero_adapter(state), without)):
            adapters.load(adapter_state)
            encoder = sim.client_models.encoder_of(client.client_id)
            bucket.append(evaluate_model(sim, adapters.model, [client], names, encoder=encoder))
    out: dict[str, float] = {}
    total = sum(m.get("eval_examples", 0) for m in per_client)
    key = "eval_accuracy" if any("eval_accuracy" in m for m in per_client) else "eval_loss"
    for name in ("eval_loss", "eval_accuracy", "eval_macro_f1", "eval_rouge_l"):
        values = [(m[name], m.get("eval_examples", 1)) for m in per_client if name in m]
        if values and total:
            out[name] = sum(v * n for v, n in values) / sum(n for _, n in values)
        plain = [(m[name], m.get("eval_examples", 1)) for m in without if name in m]
        if plain:
            out[f"{name}_no_adapter"] = sum(v * n for v, n in plain) / sum(n for _, n in plain)
    figures = [m[key] for m in per_client if key in m]
    if figures:
        short = key.removeprefix("eval_")
        out[f"eval_client_{short}_mean"] = statistics.fmean(figures)
        out[f"eval_client_{short}_std"] = statistics.stdev(figures) if len(figures) > 1 else 0.0
    out["eval_examples"] = total
    out["eval_clients"] = len(per_client)
    return out


def write_predictions(path: Path, predictions: list[dict[str, Any]]) -> None:
    """One JSON object per example (client, instruction, input, reference, generation, scores), atomically."""
    import json

    from fedlora.engine.run_folder import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
