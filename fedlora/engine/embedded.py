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
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from fedlora.adapters.lora import LoraAdapters
from fedlora.adapters.ranks import profile_of_state
from fedlora.adapters.state import AdapterState, wire_size
from fedlora.client.trainer import LocalTrainingSettings, round_seed, train_locally
from fedlora.config.schema import ExperimentConfig
from fedlora.data.encoding import Encoder
from fedlora.data.examples import ClientData, Federation
from fedlora.engine.accounting import PrivacyLedger
from fedlora.engine.checkpoint import save_checkpoint
from fedlora.engine.faults import DROPOUT, STRAGGLER, corrupt, plan_faults
from fedlora.engine.personal import ClientModels, zero_adapter
from fedlora.eval.registry import run_evaluators
from fedlora.strategies.base import ClientInstruction, ClientReply, Strategy

log = logging.getLogger(__name__)


def payload_rank(payload: AdapterState) -> str:
    """The rank profile name of a reply (``r8``, ``a30-m200``), or ``?`` if it has no consistent one."""
    try:
        return profile_of_state(payload).name
    except ValueError:
        return "?"


def same_shapes(sent: AdapterState, got: AdapterState) -> bool:
    """Whether ``got`` is an update of ``sent`` (same tensor names and shapes); seed records and pruned
    replies are not."""
    return sent.keys() == got.keys() and all(got[k].shape == v.shape for k, v in sent.items())


def update_norm(sent: AdapterState, got: AdapterState) -> float:
    """||got - sent|| over all tensors as one vector (float64)."""
    return float(sum(float((got[k].double() - sent[k].double()).pow(2).sum()) for k in sent) ** 0.5)


def clip_update(sent: AdapterState, got: AdapterState, factor: float) -> AdapterState:
    """sent + factor * (got - sent), tensor by tensor."""
    return {
        k: (sent[k].double() + factor * (got[k].double() - sent[k].double())).to(got[k].dtype) for k in got
    }


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


def resolve_settings(
    cfg: ExperimentConfig, strategy: Strategy, overrides: dict[str, Any]
) -> LocalTrainingSettings:
    """Config's client section + the strategy's default optimizer + the instruction's per-client overrides."""
    c = cfg.client
    base = LocalTrainingSettings(
        optimizer=c.optimizer or strategy.default_optimizer,
        lr=c.lr,
        weight_decay=c.weight_decay,
        momentum=c.momentum,
        local_steps=c.local_steps,
        local_epochs=c.local_epochs,
        batch_size=c.batch_size,
        grad_clip=c.grad_clip,
    )
    known = {f.name for f in fields(LocalTrainingSettings)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"strategy {strategy.name} sent unknown local-training settings {sorted(unknown)}")
    return LocalTrainingSettings(**{**base.__dict__, **overrides})


@dataclass
class Simulation:
    """Everything one experiment runs on (built once from the config)."""

    cfg: ExperimentConfig
    federation: Federation
    adapters: LoraAdapters
    encoder: Encoder
    strategy: Strategy
    privacy: PrivacyLedger | None = None
    client_models: ClientModels | None = None  # model-heterogeneous clients (each with its own weights)


def evaluate_state(
    sim: Simulation, state: AdapterState, clients: list[ClientData], metrics: list[str] | None = None
) -> dict[str, float]:
    """Load ``state`` into the shared model and run ``metrics`` (default ``eval.metrics``) on ``clients``."""
    if sim.adapters.is_full_state(state):
        sim.adapters.load_base(state)
    else:
        sim.adapters.load(state)
    assert sim.adapters.model is not None
    cfg = sim.cfg.eval
    names = cfg.metrics if metrics is None else metrics
    return run_evaluators(names, sim.adapters.model, sim.encoder, clients, cfg)


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
            bucket.append(run_evaluators(names, adapters.model, sim.encoder, [client], sim.cfg.eval))
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


class EmbeddedEngine:
    """Runs rounds ``start..cfg.federation.rounds`` of a :class:`Simulation` in this process."""

    def __init__(self, sim: Simulation, run_dir: Path, status: Callable[[str], None] | None = None) -> None:
        self.sim = sim
        self.run_dir = run_dir
        self.status = status or (lambda text: None)
        self.per_round = clients_per_round(sim.cfg, len(sim.federation.clients))
        if sim.client_models is not None:
            sim.client_models.folder = run_dir / "personal"
        self.eval_clients = evaluation_clients(sim.cfg, sim.federation)
        self.final_eval_clients = evaluation_clients(sim.cfg, sim.federation, final=True)

    def run_client(self, server_round: int, client_id: int, instruction: ClientInstruction) -> ClientReply:
        """One client's local training from its instruction (in process, on the shared model)."""
        sim = self.sim
        settings = resolve_settings(sim.cfg, sim.strategy, instruction.settings)
        adapters, payload = sim.adapters, instruction.payload
        shares_model = sim.strategy.shares_local_model  # the whole-model baseline sends local weights too
        if sim.client_models is not None:  # its own architecture, with its own weights
            adapters, payload = sim.client_models.install(client_id, server_round, payload)
        result = train_locally(
            adapters,
            sim.encoder,
            sim.federation.clients[client_id],
            payload,
            settings,
            round_seed(sim.cfg.federation.seed, server_round, client_id),
        )
        if sim.client_models is not None:
            if shares_model:
                result.state.update({k: p.detach().clone() for k, p in adapters.base_parameters()})
            result.state = sim.client_models.to_shared(result.state)
            sim.client_models.save(client_id, server_round)
        return ClientReply(client_id, result.state, result.num_examples, result.metrics)

    def train_clients(
        self, server_round: int, instructions: dict[int, ClientInstruction]
    ) -> dict[int, ClientReply | str]:
        """The transport: run every instructed client, return its reply (or why there is none).

        In process: one client after another on the shared model. Other engines (Flower) send messages.
        """
        replies: dict[int, ClientReply | str] = {}
        for position, (client_id, instruction) in enumerate(instructions.items(), start=1):
            self.status(f"round {server_round}: client {client_id} ({position}/{len(instructions)})")
            replies[client_id] = self.run_client(server_round, client_id, instruction)
        return replies

    def evaluate(self, final: bool = False, server_round: int | None = None) -> dict[str, float]:
        """The strategy's evaluation adapter on the evaluation clients (plus ``final_metrics`` if final);
        with model-heterogeneous clients, each client's own model (personalised protocol)."""
        cfg = self.sim.cfg.eval
        names = list(dict.fromkeys([*cfg.metrics, *(cfg.final_metrics if final else [])]))
        clients = self.final_eval_clients if final else self.eval_clients
        if self.sim.client_models is not None:
            after = (server_round or self.sim.cfg.federation.rounds) + 1
            return evaluate_personal(self.sim, clients, names, after)
        return evaluate_state(self.sim, self.sim.strategy.evaluation_state(), clients, names)

    def collect_replies(self, server_round: int, attempt: int, sampled: list[int]) -> dict[str, Any]:
        """Configure, run and validate the sampled clients of one attempt at a round."""
        sim, cfg = self.sim, self.sim.cfg
        instructions = sim.strategy.configure(server_round, sampled)
        faults = plan_faults(cfg.faults, cfg.federation.seed, server_round, attempt, sampled)
        out: dict[str, Any] = {"replies": [], "rejected": [], "clients": [], "bytes_down": 0, "bytes_up": 0}
        out["faults"] = {"dropped": [], "late": [], "corrupted": []}
        updates: dict[int, float] = {}
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
            if sim.privacy is not None:  # this client's DP-SGD noise plan travels with its instruction
                instruction = ClientInstruction(
                    instruction.payload, {**instruction.settings, **sim.privacy.settings_for(client_id)}
                )
            to_run[client_id] = instruction
        results = self.train_clients(server_round, to_run)
        for client_id, instruction in to_run.items():
            reply = results.get(client_id, "no reply")
            if isinstance(reply, str):
                out["rejected"].append({"client": client_id, "reason": reply})
                log.warning("round %d: client %d: %s", server_round, client_id, reply)
                continue
            if sim.privacy is not None:
                reply.metrics["epsilon"] = sim.privacy.record(client_id, int(reply.metrics["steps"]))
            fault = faults.get(client_id)
            if fault is not None:
                reply.payload = corrupt(reply.payload, fault.corruption or "nan")
                out["faults"]["corrupted"].append({"client": client_id, "kind": fault.corruption})
            size_up = wire_size(reply.payload) if counts else 0
            out["bytes_up"] += size_up
            out["clients"].append(
                {
                    "client": client_id,
                    "num_examples": reply.num_examples,
                    "bytes_up": size_up,
                    "rank": payload_rank(reply.payload),
                    **reply.metrics,
                }
            )
            reason = sim.strategy.validate_reply(instruction, reply)
            if reason is None and same_shapes(instruction.payload, reply.payload):
                norm = update_norm(instruction.payload, reply.payload)
                limit = cfg.federation.max_update_norm
                if limit is not None and norm > limit:
                    reason = f"update norm {norm:.3g} above federation.max_update_norm ({limit})"
                updates[client_id] = norm
            if reason is not None:
                log.warning("round %d: rejected the reply of client %d: %s", server_round, client_id, reason)
                out["rejected"].append({"client": client_id, "reason": reason})
                continue
            out["replies"].append((instruction, reply))
        self.screen_update_norms(server_round, out, updates)
        return out

    def screen_update_norms(self, server_round: int, out: dict[str, Any], norms: dict[int, float]) -> None:
        """Reject updates far above the round's median norm; clip the others if configured."""
        fed = self.sim.cfg.federation
        kept = []
        valid = sorted(norms[r.client_id] for _, r in out["replies"] if r.client_id in norms)
        median = valid[len(valid) // 2] if valid else 0.0
        for instruction, reply in out["replies"]:
            norm = norms.get(reply.client_id)
            ratio = fed.max_update_norm_ratio
            if norm is not None and ratio and len(valid) >= 3 and median > 0 and norm > ratio * median:
                reason = (
                    f"update norm {norm:.3g} is {norm / median:.3g}x the round's median "
                    f"(above federation.max_update_norm_ratio {fed.max_update_norm_ratio})"
                )
                log.warning(
                    "round %d: rejected the reply of client %d: %s", server_round, reply.client_id, reason
                )
                out["rejected"].append({"client": reply.client_id, "reason": reason})
                continue
            if norm is not None and fed.clip_update_norm is not None and norm > fed.clip_update_norm:
                reply.payload = clip_update(instruction.payload, reply.payload, fed.clip_update_norm / norm)
            kept.append(reply)
        out["replies"] = kept

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
        if status == "aggregated":
            sim.strategy.aggregate(server_round, replies)
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
        }
        if any(faults.values()):
            record["faults"] = faults
        if sim.privacy is not None:
            record["epsilon_max"] = sim.privacy.max_epsilon()
        final = server_round == cfg.federation.rounds
        if server_round % cfg.eval.every == 0 or final:
            count = len(self.final_eval_clients if final else self.eval_clients)
            self.status(f"round {server_round}: evaluating on {count} clients")
            record.update(self.evaluate(final, server_round))
        record["seconds"] = time.perf_counter() - started
        record["peak_rss_mb"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )  # process peak so far
        record["clients"] = totals["clients"]
        record["rejected"] = totals["rejected"]
        return record

    def checkpoint_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"strategy": self.sim.strategy.name}
        if self.sim.privacy is not None:
            meta["privacy"] = self.sim.privacy.to_json()
        return meta

    def run(self, start_round: int, on_round: Callable[[dict[str, Any]], None]) -> None:
        """Rounds ``start_round..rounds``: each is logged through ``on_round`` and then checkpointed."""
        cfg = self.sim.cfg
        for server_round in range(start_round, cfg.federation.rounds + 1):
            record = self.run_round(server_round)
            on_round(record)
            save_checkpoint(
                self.run_dir / "checkpoints",
                server_round,
                self.sim.strategy.server_state(),
                self.checkpoint_meta(),
                keep=cfg.output.keep_checkpoints,
            )
