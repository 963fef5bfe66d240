"""The embedded simulation engine: all clients in this process, one after another, on ONE shared base model.

Each round: sample clients (seeded by run seed and round) -> ``strategy.configure`` -> for each client load
its payload into the shared model, train locally, read its adapter back -> ``strategy.validate_reply``
(rejected replies are logged and left out; the round goes on) -> ``strategy.aggregate`` -> evaluate the
global adapter -> log metrics -> checkpoint. Every payload is counted in bytes as its safetensors
serialisation, down and up. The engine knows no method by name: only the strategy hooks.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fedlora.adapters.lora import LoraAdapters
from fedlora.adapters.ranks import profile_of_state
from fedlora.adapters.state import AdapterState, wire_size
from fedlora.client.node import ClientNode
from fedlora.compute import autocast, model_device, process_peak_memory
from fedlora.config.schema import ExperimentConfig
from fedlora.data.encoding import Encoder
from fedlora.data.examples import ClientData, Federation
from fedlora.engine.checkpoint import save_checkpoint
from fedlora.engine.faults import DROPOUT, STRAGGLER, corrupt, plan_faults
from fedlora.eval.registry import run_evaluators
from fedlora.models.personal import ClientModels, zero_adapter
from fedlora.protocol import ClientInstruction, ClientReply
from fedlora.strategies.base import Strategy

log = logging.getLogger(__name__)


def payload_rank(payload: AdapterState) -> str:
    """The rank profile name of a reply (``r8``, ``a30-m200``), or ``?`` if it has no consistent one."""
    try:
        return profile_of_state(payload).name
    except ValueError:
        return "?"


def sample_clients(
    num_clients: int, per_round: int, seed: int, server_round: int, attempt: int = 0
) -> list[int]:
    """``per_round`` distinct client ids, sorted; depends only on (seed, round, attempt)."""
    rng = random.Random(f"{seed}/sample/{server_round}" + (f"/retry{attempt}" if attempt else ""))
    return sorted(rng.sample(range(num_clients), per_round))


def clients_per_round(cfg: ExperimentConfig, num_clients: int) -> int:
    fed = cfg.federation
    if fed.clients_per_round is not None:
        if fed.clients_per_round > num_clients:
            raise ValueError(
                f"federation.clients_per_round ({fed.clients_per_round}) is above the {num_clients} clients the data yields"
            )
        return fed.clients_per_round
    if fed.fraction is not None:
        return max(1, math.ceil(fed.fraction * num_clients))
    return num_clients


def evaluation_clients(
    cfg: ExperimentConfig, federation: Federation, final: bool = False
) -> list[ClientData]:
    """The held-out clients if there are any (zero-shot protocol), else the training clients; then a fixed
    seeded sample of ``eval.max_clients`` (``eval.final_max_clients`` after the last round) of those that
    have the eval split (all if unset)."""
    pool = federation.held_out or federation.clients
    having = [c for c in pool if c.size(cfg.eval.split) > 0]
    limit = cfg.eval.final_max_clients if final else cfg.eval.max_clients
    if limit is None or limit >= len(having):
        return having
    rng = random.Random(f"{cfg.federation.seed}/eval")
    return sorted(rng.sample(having, limit), key=lambda c: c.client_id)


@dataclass
class Simulation:
    """Everything one experiment runs on (built once from the config)."""

    cfg: ExperimentConfig
    federation: Federation
    adapters: LoraAdapters
    encoder: Encoder
    strategy: Strategy  # the method, inside its wrappers (privacy, update-norm screening)
    client_models: ClientModels | None = None  # model-heterogeneous clients (each with its own weights)
    node: ClientNode | None = None  # the clients, in this process (None: they live elsewhere)


class RunInterrupted(Exception):
    """A stop was asked for (SIGINT / SIGTERM): the current round was abandoned, the last checkpoint stands."""

    def __init__(self, signum: int, last_round: int) -> None:
        super().__init__(f"interrupted by signal {signum} after round {last_round}")
        self.signum = signum
        self.last_round = last_round


class RunFailed(RuntimeError):
    """The run cannot make progress (``federation.max_skipped_rounds`` rounds in a row were skipped)."""


class StopFlag:
    """Set by a signal handler; checked by the engine between clients and between rounds."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


class Transport(Protocol):
    """How a round's instructions reach the sampled clients and their replies come back."""

    def train_clients(
        self, server_round: int, instructions: dict[int, ClientInstruction]
    ) -> dict[int, ClientReply | str]:
        """Each instructed client's reply, or why there is none."""
        ...


class InProcessTransport:
    """The clients in this process, one after another, on the shared model (through ``run_client``)."""

    def __init__(
        self,
        run_client: Callable[[int, int, ClientInstruction], ClientReply],
        status: Callable[[str], None],
        stop: StopFlag | None = None,
        run_many: Callable[[int, dict[int, ClientInstruction]], dict[int, ClientReply]] | None = None,
    ) -> None:
        self.run_client = run_client
        self.run_many = run_many  # all of a round's clients at once (compute.batch_clients)
        self.status = status
        self.stop = stop if stop is not None else StopFlag()

    def train_clients(
        self, server_round: int, instructions: dict[int, ClientInstruction]
    ) -> dict[int, ClientReply | str]:
        if self.run_many is not None:
            if self.stop:
                raise RunInterrupted(self.stop.signum or 0, server_round - 1)
            self.status(f"round {server_round}: {len(instructions)} clients in one batched pass")
            return dict(self.run_many(server_round, instructions))
        replies: dict[int, ClientReply | str] = {}
        for position, (client_id, instruction) in enumerate(instructions.items(), start=1):
            if self.stop:  # abandon the round: nothing of it is written, the last checkpoint stands
                raise RunInterrupted(self.stop.signum or 0, server_round - 1)
            self.status(f"round {server_round}: client {client_id} ({position}/{len(instructions)})")
            replies[client_id] = self.run_client(server_round, client_id, instruction)
        return replies


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
    cfg = sim.cfg.eval
    names = cfg.metrics if metrics is None else metrics
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
    with autocast(sim.cfg.compute.precision, model_device(model)):
        return run_evaluators(names, model, encoder or sim.encoder, clients, sim.cfg.eval, predictions)


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
            client.client_id, before_round, sim.strategy.personal_state(client.client_id)
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


class EmbeddedEngine:
    """Runs rounds ``start..cfg.federation.rounds`` of a :class:`Simulation`: the round logic, with the
    clients reached through a transport (default: in this process; Flower: :mod:`fedlora.engine.flower`)."""

    def __init__(
        self,
        sim: Simulation,
        run_dir: Path,
        status: Callable[[str], None] | None = None,
        transport: Transport | None = None,
        stop: StopFlag | None = None,
    ) -> None:
        self.sim = sim
        self.run_dir = run_dir
        self.status = status or (lambda text: None)
        self.stop = stop if stop is not None else StopFlag()
        self.meta_extra: dict[str, Any] = {}  # e.g. the config's checksum, kept in every checkpoint
        self.per_round = clients_per_round(sim.cfg, len(sim.federation.clients))
        if sim.node is not None:
            sim.node.use_store(run_dir / "personal")
        elif sim.client_models is not None:
            sim.client_models.folder = run_dir / "personal"
        batched = sim.node.train_many if sim.node is not None and sim.cfg.compute.batch_clients else None
        self.transport: Transport = transport or InProcessTransport(
            lambda r, c, i: self.run_client(r, c, i), lambda text: self.status(text), self.stop, batched
        )
        self.eval_clients = evaluation_clients(sim.cfg, sim.federation)
        self.final_eval_clients = evaluation_clients(sim.cfg, sim.federation, final=True)

    def run_client(self, server_round: int, client_id: int, instruction: ClientInstruction) -> ClientReply:
        """One client's local training from its instruction (in process)."""
        assert self.sim.node is not None, "this simulation has no in-process clients"
        self.complete(instruction)
        return self.sim.node.train(server_round, client_id, instruction)

    def complete(self, instruction: ClientInstruction) -> None:
        """Clients know no strategy: the optimizer it is defined with travels in the settings."""
        optimizer = self.sim.cfg.client.optimizer or self.sim.strategy.default_optimizer
        instruction.settings.setdefault("optimizer", optimizer)

    def train_clients(
        self, server_round: int, instructions: dict[int, ClientInstruction]
    ) -> dict[int, ClientReply | str]:
        """Hand the round's instructions to the transport."""
        return self.transport.train_clients(server_round, instructions)

    def evaluate(self, final: bool = False, server_round: int | None = None) -> dict[str, float]:
        """The strategy's evaluation adapter on the evaluation clients (plus ``final_metrics`` if final);
        with model-heterogeneous clients, each client's own model (personalised protocol)."""
        cfg = self.sim.cfg.eval
        names = list(dict.fromkeys([*cfg.metrics, *(cfg.final_metrics if final else [])]))
        clients = self.final_eval_clients if final else self.eval_clients
        if self.sim.client_models is not None:
            after = (server_round or self.sim.cfg.federation.rounds) + 1
            return evaluate_personal(self.sim, clients, names, after)
        predictions: list[dict[str, Any]] = []
        figures = evaluate_state(self.sim, self.sim.strategy.evaluation_state(), clients, names, predictions)
        if final and predictions:  # what the final model said, kept for reading
            write_predictions(self.run_dir / "eval" / "final.predictions.jsonl", predictions)
        extras = self.sim.strategy.extra_evaluation_states() if final else {}
        for label, state in extras.items():  # other global models the method defines (FlexLoRA's full Delta)
            extra = evaluate_state(self.sim, state, clients, names)
            counts = ("eval_examples", "eval_clients", "eval_generated")
            figures.update({f"{k}_{label}": v for k, v in extra.items() if k not in counts})
        if extras:  # the shared model back as the global model (base weights pristine)
            evaluate_state_load(self.sim, self.sim.strategy.evaluation_state())
        return figures

    def collect_replies(self, server_round: int, attempt: int, sampled: list[int]) -> dict[str, Any]:
        """Configure, run and validate the sampled clients of one attempt at a round."""
        sim, cfg = self.sim, self.sim.cfg
        instructions = sim.strategy.configure(server_round, sampled)
        for instruction in instructions.values():
            self.complete(instruction)
        faults = plan_faults(cfg.faults, cfg.federation.seed, server_round, attempt, sampled)
        out: dict[str, Any] = {"replies": [], "rejected": [], "clients": [], "bytes_down": 0, "bytes_up": 0}
        out["faults"] = {"dropped": [], "late": [], "corrupted": []}
        payload_sizes: dict[
            int, int
        ] = {}  # one serialisation per distinct payload object (often all share one)
        counts = sim.strategy.communicates  # a standalone baseline sends nothing
        to_run: dict[int, ClientInstruction] = {}
        for client_id in sampled:
            instruction = instructions[client_id]
            payload_key = id(instruction.payload)
            if payload_key not in payload_sizes:
                payload_sizes[payload_key] = wire_size(instruction.payload)
            out["bytes_down"] += payload_sizes[payload_key] if counts else 0
            fault = faults.get(client_id)
            if fault is not None and fault.kind in (DROPOUT, STRAGGLER):
                what = (
                    "dropped out: no reply"
                    if fault.kind == DROPOUT
                    else "straggler: reply past the round deadline"
                )
                out["faults"]["dropped" if fault.kind == DROPOUT else "late"].append(client_id)
                out["rejected"].append({"client": client_id, "reason": what})
                log.warning("round %d: client %d %s", server_round, client_id, what)
                continue
            to_run[client_id] = instruction
        results = self.train_clients(server_round, to_run)
        for client_id, instruction in to_run.items():
            reply = results.get(client_id, "no reply")
            if isinstance(reply, str):
                out["rejected"].append({"client": client_id, "reason": reply})
                log.warning("round %d: client %d: %s", server_round, client_id, reply)
                continue
            fault = faults.get(client_id)
            if fault is not None:
                reply.payload = corrupt(reply.payload, fault.corruption or "nan")
                out["faults"]["corrupted"].append({"client": client_id, "kind": fault.corruption})
            size_up = wire_size(reply.payload) if counts else 0
            out["bytes_up"] += size_up
            reason = sim.strategy.validate_reply(instruction, reply)  # wrappers add to the metrics here
            out["clients"].append(
                {
                    "client": client_id,
                    "num_examples": reply.num_examples,
                    "bytes_up": size_up,
                    "rank": payload_rank(reply.payload),
                    **reply.metrics,
                }
            )
            if reason is not None:
                self.reject(server_round, out, client_id, reason)
                continue
            out["replies"].append(reply)
        out["replies"], screened = sim.strategy.screen(out["replies"])
        for client_id, reason in screened:
            self.reject(server_round, out, client_id, reason)
        return out

    @staticmethod
    def reject(server_round: int, out: dict[str, Any], client_id: int, reason: str) -> None:
        log.warning("round %d: rejected the reply of client %d: %s", server_round, client_id, reason)
        out["rejected"].append({"client": client_id, "reason": reason})

    def run_round(self, server_round: int) -> dict[str, Any]:
        """One full round (with retries when too few replies are valid); returns its metrics record."""
        sim, cfg = self.sim, self.sim.cfg
        fed = cfg.federation
        started = time.perf_counter()
        torch.set_num_threads(cfg.client.num_threads)
        attempts = 1 + (fed.max_retries if fed.on_too_few == "retry" else 0)
        totals = {"bytes_down": 0, "bytes_up": 0, "clients": [], "rejected": []}
        faults: dict[str, list[Any]] = {"dropped": [], "late": [], "corrupted": []}
        for attempt in range(attempts):
            sampled = sample_clients(
                len(sim.federation.clients), self.per_round, fed.seed, server_round, attempt
            )
            got = self.collect_replies(server_round, attempt, sampled)
            for key in totals:
                totals[key] += got[key]
            for key in faults:
                faults[key] += got["faults"][key]
            replies = got["replies"]
            if len(replies) >= fed.min_replies:
                break
            log.warning(
                "round %d attempt %d: %d valid replies, fewer than federation.min_replies (%d)",
                server_round,
                attempt + 1,
                len(replies),
                fed.min_replies,
            )
        status = "aggregated" if len(replies) >= fed.min_replies else "skipped"
        aggregate_seconds = 0.0
        if status == "aggregated":
            aggregating = time.perf_counter()
            sim.strategy.aggregate(server_round, replies)
            aggregate_seconds = time.perf_counter() - aggregating
        else:
            log.warning("round %d skipped: the global adapter is unchanged", server_round)
            replies = []
        reported = [r for r in replies if "train_loss" in r.metrics]  # none under DP: not released
        total = sum(r.num_examples for r in reported)
        train_loss = (
            sum(r.metrics["train_loss"] * r.num_examples for r in reported) / total if total else None
        )
        record: dict[str, Any] = {
            "round": server_round,
            "train_loss": train_loss,
            "num_clients": len(replies),
            "num_sampled": len(sampled),
            "bytes_up": totals["bytes_up"],
            "bytes_down": totals["bytes_down"],
            "status": status,
            "attempts": attempt + 1,
            "aggregate_seconds": aggregate_seconds,  # the server rule's own time (wrappers included)
        }
        if any(faults.values()):
            record["faults"] = faults
        record.update(sim.strategy.round_metrics())
        final = server_round == cfg.federation.rounds
        if server_round % cfg.eval.every == 0 or final:
            count = len(self.final_eval_clients if final else self.eval_clients)
            self.status(f"round {server_round}: evaluating on {count} clients")
            record.update(self.evaluate(final, server_round))
        record["seconds"] = time.perf_counter() - started
        # the run's peak so far: the largest of the server process's and of each process that trained a client
        # this round (a worker's own peak; in process, the same process)
        for key, value in process_peak_memory().items():
            peaks = [value, *(float(c[key]) for c in totals["clients"] if c.get(key) is not None)]
            record[key] = max(peaks)
        record["clients"] = totals["clients"]
        record["rejected"] = totals["rejected"]
        return record

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"strategy": self.sim.strategy.name, **self.meta_extra, **self.sim.strategy.server_meta()}

    def run(self, start_round: int, on_round: Callable[[dict[str, Any]], bool | None]) -> None:
        """Rounds ``start_round..rounds``: each is logged through ``on_round`` and then checkpointed; when
        ``on_round`` returns False (early stopping) that round is the last."""
        cfg = self.sim.cfg
        skipped: list[dict[str, Any]] = []  # the records of the rounds skipped in a row
        for server_round in range(start_round, cfg.federation.rounds + 1):
            if self.stop:
                raise RunInterrupted(self.stop.signum or 0, server_round - 1)
            record = self.run_round(server_round)
            keep_going = on_round(record)
            skipped = [*skipped, record] if record["status"] == "skipped" else []
            save_checkpoint(
                self.run_dir / "checkpoints",
                server_round,
                self.sim.strategy.server_state(),
                self.checkpoint_meta(),
                keep=cfg.output.keep_checkpoints,
            )
            limit = cfg.federation.max_skipped_rounds
            if limit is not None and len(skipped) >= limit:
                reasons = Counter(r["reason"].split(" (")[0] for rec in skipped for r in rec["rejected"])
                common = "; ".join(f"{n}x {reason}" for reason, n in reasons.most_common(3)) or "no replies"
                raise RunFailed(
                    f"{len(skipped)} rounds in a row were skipped (rounds {skipped[0]['round']}..{server_round}: "
                    f"fewer than federation.min_replies valid replies; most common rejections: {common}). "
                    "The global adapter is unchanged since; nothing was exported"
                )
            if keep_going is False:
                log.warning("round %d: early stopping, the last round of this run", server_round)
                return
