"""The embedded simulation engine: all clients in this process, one after another, on ONE shared base model.

Each round: sample clients (seeded by run seed and round) -> ``configure_round`` -> the transport trains
them (in process: load the payload into the shared model, train locally, read the adapter back) -> ``review``
(rejected replies are logged and left out; the round goes on) -> ``aggregate`` -> evaluate the global adapter
-> log metrics -> checkpoint the whole server state. The state is the engine's (:class:`~fedlora.engine.server.Server`):
each hook gets it and returns the next. Every payload is counted in bytes as its safetensors serialisation,
down and up. The engine knows no method by name: only the strategy hooks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedlora.adapters.ranks import profile_of_state
from fedlora.adapters.state import AdapterState, wire_size
from fedlora.adapters.wire import decode_state, encode_state, restore_updates
from fedlora.compute import process_peak_memory
from fedlora.engine.checkpoint import save_checkpoint
from fedlora.engine.evaluation import (
    evaluate_model,
    evaluate_personal,
    evaluate_state,
    evaluate_state_load,
    write_predictions,
)
from fedlora.engine.faults import DROPOUT, STRAGGLER, corrupt, plan_faults
from fedlora.engine.sampling import clients_per_round, evaluation_clients, sample_clients
from fedlora.engine.transport import (
    InProcessTransport,
    RoundPlan,
    RunFailed,
    RunInterrupted,
    Simulation,
    StopFlag,
    Transport,
)
from fedlora.protocol import ClientInstruction, ClientReply
from fedlora.strategies.base import RoundResults

log = logging.getLogger(__name__)


def payload_rank(payload: AdapterState) -> str:
    """The rank profile name of a reply (``r8``, ``a30-m200``), or ``?`` if it has no consistent one."""
    try:
        return profile_of_state(payload).name
    except ValueError:
        return "?"


@dataclass
class RoundOutcome:
    """What one attempt at a round (or, summed with :meth:`add`, all its attempts) produced: the valid
    replies to aggregate, the per-client lines of the round's record, every rejection with its reason, the
    bytes each way, and the injected faults (client ids dropped and late, corrupted replies)."""

    server_round: int
    replies: list[ClientReply] = field(default_factory=list)
    #: one line per client that replied: client, num_examples, bytes_up, rank and its metrics
    clients: list[dict[str, Any]] = field(default_factory=list)
    #: {"client": id, "reason": why} for each client left out
    rejected: list[dict[str, Any]] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    dropped: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    corrupted: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, client_id: int, reason: str, logged: str) -> None:
        """Leave ``client_id`` out for ``reason``, logging ``round N: <logged>``."""
        log.warning("round %d: %s", self.server_round, logged)
        self.rejected.append({"client": client_id, "reason": reason})

    def add(self, other: RoundOutcome) -> None:
        """Sum another attempt into this one (its replies are not carried: only the last attempt's count)."""
        self.clients += other.clients
        self.rejected += other.rejected
        self.bytes_down += other.bytes_down
        self.bytes_up += other.bytes_up
        self.dropped += other.dropped
        self.late += other.late
        self.corrupted += other.corrupted

    def faults(self) -> dict[str, list[Any]]:
        """The injected faults, as the round's record keeps them."""
        return {"dropped": self.dropped, "late": self.late, "corrupted": self.corrupted}


def training_figures(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """A round's training as the clients reported it (what a client did not report is left out: under DP
    only its step count leaves it).

    ``learning_rate``: the mean of the clients' rates (equal unless a method spreads them);
    ``train_tokens_per_second``: sum of tokens / sum of the clients' training seconds (one client's
    throughput); ``step_losses``: ``l_s = mean over the clients with a step s of their step-s loss``, one per
    local optimizer step (the run windows them by ``output.logging_steps`` into ``loss_steps``)."""
    out: dict[str, Any] = {}
    rates = [float(m["learning_rate"]) for m in metrics if "learning_rate" in m]
    if rates:
        out["learning_rate"] = sum(rates) / len(rates)
    timed = [m for m in metrics if "tokens" in m and m.get("train_seconds")]
    if timed:
        out["train_tokens_per_second"] = sum(m["tokens"] for m in timed) / sum(
            m["train_seconds"] for m in timed
        )
    curves = [m["step_losses"] for m in metrics if m.get("step_losses")]
    if curves:
        longest = max(len(c) for c in curves)
        out["step_losses"] = [
            sum(c[s] for c in curves if len(c) > s) / sum(1 for c in curves if len(c) > s)
            for s in range(longest)
        ]
    return out


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
        plan = self.plan
        self.per_round = clients_per_round(plan.federation, len(sim.federation.clients))
        if sim.node is not None:
            sim.node.use_store(run_dir / "personal")
        elif sim.client_models is not None:
            sim.client_models.folder = run_dir / "personal"
        batched = sim.node.train_many if sim.node is not None and plan.batch_clients else None
        self.transport: Transport = transport or InProcessTransport(
            lambda r, c, i: self.run_client(r, c, i), lambda text: self.status(text), self.stop, batched
        )
        seed = plan.federation.seed
        self.eval_clients = evaluation_clients(plan.eval, seed, sim.federation)
        self.final_eval_clients = evaluation_clients(plan.eval, seed, sim.federation, final=True)

    @property
    def plan(self) -> RoundPlan:
        """The config as the round loop reads it (nothing else of it)."""
        return self.sim.plan

    def run_client(self, server_round: int, client_id: int, instruction: ClientInstruction) -> ClientReply:
        """One client's local training from its instruction (in process)."""
        assert self.sim.node is not None, "this simulation has no in-process clients"
        self.complete(instruction)
        return self.sim.node.train(server_round, client_id, instruction)

    def complete(self, instruction: ClientInstruction) -> None:
        """Clients know no strategy: the optimizer it is defined with travels in the settings."""
        optimizer = self.plan.optimizer or self.sim.strategy.default_optimizer
        instruction.settings.setdefault("optimizer", optimizer)

    def train_clients(
        self, server_round: int, instructions: dict[int, ClientInstruction]
    ) -> dict[int, ClientReply | str]:
        """Hand the round's instructions to the transport."""
        return self.transport.train_clients(server_round, instructions)

    def evaluate(self, final: bool = False, server_round: int | None = None) -> dict[str, float]:
        """The strategy's evaluation adapter on the evaluation clients (plus ``final_metrics`` if final);
        with model-heterogeneous clients, each client's own model (personalised protocol)."""
        cfg = self.plan.eval
        names = list(dict.fromkeys([*cfg.metrics, *(cfg.final_metrics if final else [])]))
        clients = self.final_eval_clients if final else self.eval_clients
        if self.sim.client_models is not None:
            after = (server_round or self.plan.federation.rounds) + 1
            return evaluate_personal(self.sim, clients, names, after)
        predictions: list[dict[str, Any]] = []
        figures = evaluate_state(self.sim, self.sim.server.evaluation_state(), clients, names, predictions)
        if final and predictions:  # what the final model said, kept for reading
            write_predictions(self.run_dir / "eval" / "final.predictions.jsonl", predictions)
        extras = self.sim.server.extra_evaluation_states() if final else {}
        for label, state in extras.items():  # other global models the method defines (FlexLoRA's full Delta)
            extra = evaluate_state(self.sim, state, clients, names)
            counts = ("eval_examples", "eval_clients", "eval_generated")
            figures.update({f"{k}_{label}": v for k, v in extra.items() if k not in counts})
        if extras:  # the shared model back as the global model (base weights pristine)
            evaluate_state_load(self.sim, self.sim.server.evaluation_state())
        return figures

    def collect_replies(self, server_round: int, attempt: int, sampled: list[int]) -> RoundOutcome:
        """Configure, run and validate the sampled clients of one attempt at a round."""
        sim, plan = self.sim, self.plan
        instructions = sim.server.configure(server_round, sampled)
        for instruction in instructions.values():
            self.complete(instruction)
        faults = plan_faults(plan.faults, plan.federation.seed, server_round, attempt, sampled)
        out = RoundOutcome(server_round)
        # one encoding and serialisation per distinct payload object (often all share one)
        wire_dtype = plan.federation.wire_dtype
        # id(payload) -> (its wire form, the payload as it arrives, its bytes)
        sent: dict[int, tuple[AdapterState, AdapterState, int]] = {}
        counts = sim.strategy.communicates  # a standalone baseline sends nothing
        to_run: dict[int, ClientInstruction] = {}
        for client_id in sampled:
            instruction = instructions[client_id]
            payload_key = id(instruction.payload)
            if payload_key not in sent:
                wire = encode_state(instruction.payload, wire_dtype)
                sent[payload_key] = (wire, decode_state(wire), wire_size(wire))
            wire, arrives, size = sent[payload_key]
            out.bytes_down += size if counts else 0
            # the transport carries the wire form; the screens compare the reply with what the client got
            request = dataclasses.replace(
                instruction,
                payload=wire,
                wire_dtype=wire_dtype,
                wire_error_feedback=plan.federation.wire_error_feedback,
            )
            instruction.payload = arrives
            fault = faults.get(client_id)
            if fault is not None and fault.kind in (DROPOUT, STRAGGLER):
                dropped = fault.kind == DROPOUT
                (out.dropped if dropped else out.late).append(client_id)
                what = "dropped out: no reply" if dropped else "straggler: reply past the round deadline"
                out.reject(client_id, what, f"client {client_id} {what}")
                continue
            to_run[client_id] = request
        results = self.train_clients(server_round, to_run)
        arrived: RoundResults = []
        for client_id in to_run:
            instruction = instructions[client_id]
            reply = results.get(client_id, "no reply")
            if isinstance(reply, str):
                out.reject(client_id, reply, f"client {client_id}: {reply}")
                continue
            size_up = (
                (reply.bytes_sent if reply.bytes_sent is not None else wire_size(reply.payload))
                if counts
                else 0
            )
            reply.payload = restore_updates(decode_state(reply.payload), instruction.payload)
            fault = faults.get(client_id)
            if fault is not None:
                reply.payload = corrupt(reply.payload, fault.corruption or "nan")
                out.corrupted.append({"client": client_id, "kind": fault.corruption})
            out.bytes_up += size_up
            out.clients.append(
                {
                    "client": client_id,
                    "num_examples": reply.num_examples,
                    "bytes_up": size_up,
                    "rank": payload_rank(reply.payload),
                }
            )
            arrived.append((instruction, reply))
        review = sim.server.review(server_round, arrived)
        for line, (_, reply) in zip(out.clients, arrived, strict=True):
            line.update(reply.metrics)  # with what the review added (a DP wrapper's epsilon)
        for client_id, reason in review.rejected:
            out.reject(client_id, reason, f"rejected the reply of client {client_id}: {reason}")
        out.replies = review.accepted
        return out

    def run_round(self, server_round: int) -> dict[str, Any]:
        """One full round (with retries when too few replies are valid); returns its metrics record."""
        sim, plan = self.sim, self.plan
        fed = plan.federation
        started = time.perf_counter()
        torch.set_num_threads(plan.num_threads)
        attempts = 1 + (fed.max_retries if fed.on_too_few == "retry" else 0)
        totals = RoundOutcome(server_round)
        for attempt in range(attempts):
            sampled = sample_clients(
                len(sim.federation.clients), self.per_round, fed.seed, server_round, attempt
            )
            got = self.collect_replies(server_round, attempt, sampled)
            totals.add(got)
            replies = got.replies
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
            sim.server.aggregate(server_round, replies)
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
            **training_figures([r.metrics for r in replies]),
            "num_clients": len(replies),
            "num_sampled": len(sampled),
            "bytes_up": totals.bytes_up,
            "bytes_down": totals.bytes_down,
            "status": status,
            "attempts": attempt + 1,
            "aggregate_seconds": aggregate_seconds,  # the server rule's own time (wrappers included)
        }
        faults = totals.faults()
        if any(faults.values()):
            record["faults"] = faults
        record.update(sim.server.round_metrics())
        final = server_round == fed.rounds
        if server_round % plan.eval.every == 0 or final:
            count = len(self.final_eval_clients if final else self.eval_clients)
            self.status(f"round {server_round}: evaluating on {count} clients")
            record.update(self.evaluate(final, server_round))
        record["seconds"] = time.perf_counter() - started
        # the run's peak so far: the largest of the server process's and of each process that trained a client
        # this round (a worker's own peak; in process, the same process)
        for key, value in process_peak_memory().items():
            peaks = [value, *(float(c[key]) for c in totals.clients if c.get(key) is not None)]
            record[key] = max(peaks)
        record["clients"] = totals.clients
        record["rejected"] = totals.rejected
        return record

    def run(self, start_round: int, on_round: Callable[[dict[str, Any]], bool | None]) -> None:
        """Rounds ``start_round..rounds``: each is logged through ``on_round`` and then checkpointed; when
        ``on_round`` returns False (early stopping) that round is the last."""
        plan = self.plan
        skipped: list[dict[str, Any]] = []  # the records of the rounds skipped in a row
        for server_round in range(start_round, plan.federation.rounds + 1):
            if self.stop:
                raise RunInterrupted(self.stop.signum or 0, server_round - 1)
            record = self.run_round(server_round)
            keep_going = on_round(record)
            skipped = [*skipped, record] if record["status"] == "skipped" else []
            tensors, state_meta = self.sim.server.checkpoint()
            meta = {"strategy": self.sim.strategy.name, **self.meta_extra, **state_meta}
            save_checkpoint(self.run_dir / "checkpoints", server_round, tensors, meta, plan.keep_checkpoints)
            limit = plan.federation.max_skipped_rounds
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


__all__ = [
    "EmbeddedEngine",
    "RoundOutcome",
    "RoundPlan",
    "InProcessTransport",
    "RunFailed",
    "RunInterrupted",
    "Simulation",
    "StopFlag",
    "Transport",
    "clients_per_round",
    "evaluate_model",
    "evaluate_personal",
    "evaluate_state",
    "evaluate_state_load",
    "evaluation_clients",
    "payload_rank",
    "sample_clients",
    "write_predictions",
]
