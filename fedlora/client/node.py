"""A client node: the clients' data and model(s) in one process, answering one instruction at a time.

The same object serves every transport: the embedded engine calls it in process, a Flower ClientApp keeps one
across messages (its model and data loaded once), a worker process keeps its own. It knows no strategy: what a
method wants from its clients arrives in the instruction (payload, generic settings, hook objects).
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedlora.adapters.lora import LoraAdapters
from fedlora.adapters.state import AdapterState
from fedlora.adapters.wire import decode_state, encode_reply
from fedlora.client.batched import BatchedJob, batch_refusal, train_clients_together
from fedlora.client.settings import OVERRIDABLE, DPSettings, LocalTrainingSettings
from fedlora.client.steps import round_seed
from fedlora.client.store import PersonalStore
from fedlora.client.trainer import train_locally
from fedlora.compute import process_peak_memory
from fedlora.config.schema import ClientConfig
from fedlora.data.encoding import Encoder
from fedlora.data.examples import ClientData
from fedlora.models.personal import ClientModels
from fedlora.protocol import ClientInstruction, ClientReply

log = logging.getLogger(__name__)


def resolve_settings(
    client: ClientConfig, overrides: dict[str, Any], precision: str = "fp32", total_rounds: int = 1
) -> LocalTrainingSettings:
    """The config's client section + the instruction's generic overrides (``privacy`` as a dict) + the
    node's ``compute.precision`` and the run's length (``federation.rounds``, for a schedule across rounds)."""
    unknown = set(overrides) - set(OVERRIDABLE) - {"privacy"}
    if unknown:
        known = ", ".join([*OVERRIDABLE, "privacy"])
        raise ValueError(
            f"unknown local-training settings {sorted(unknown)} in the instruction (generic ones: {known}; "
            "method-specific behaviour travels as client hooks)"
        )
    values: dict[str, Any] = {
        f.name: getattr(client, f.name)
        for f in fields(LocalTrainingSettings)
        if hasattr(client, f.name) and f.name != "privacy"
    }
    values.update({k: v for k, v in overrides.items() if k != "privacy"})
    if values.get("optimizer") is None:
        raise ValueError("the instruction names no optimizer and client.optimizer is unset")
    privacy = overrides.get("privacy")
    dp = DPSettings(**privacy) if privacy else None
    return LocalTrainingSettings(**values, privacy=dp, precision=precision, total_rounds=total_rounds)


def with_peak_memory(metrics: dict[str, Any]) -> dict[str, Any]:
    """A reply's metrics plus the training process's peak memory (:func:`fedlora.compute.process_peak_memory`),
    released exactly where the training time is: a DP-SGD reply releases neither (both depend on the private
    batches' lengths)."""
    return {**metrics, **process_peak_memory()} if "train_seconds" in metrics else metrics


class ClientNode:
    """Runs clients' local rounds on the models it holds (one shared base model, or one per architecture)."""

    def __init__(
        self,
        client: ClientConfig,
        run_seed: int,
        clients: list[ClientData],
        adapters: LoraAdapters,
        encoder: Encoder,
        client_models: ClientModels | None = None,
        precision: str = "fp32",
        total_rounds: int = 1,
    ) -> None:
        self.client = client
        self.run_seed = run_seed
        self.clients = {c.client_id: c for c in clients}
        self.adapters = adapters
        self.encoder = encoder
        self.client_models = client_models
        self.precision = precision
        self.total_rounds = total_rounds
        self.store: PersonalStore | None = None  # set by whoever runs the node (use_store)
        self._batch_notes: set[str] = set()

    def use_store(self, folder: Path) -> None:
        """Personal client state (hooks' and per-architecture weights) lives under ``folder``."""
        self.store = PersonalStore(folder)
        if self.client_models is not None:
            self.client_models.store = self.store

    def train_many(
        self, server_round: int, instructions: dict[int, ClientInstruction]
    ) -> dict[int, ClientReply]:
        """Several clients' local rounds in one batched pass (:mod:`fedlora.client.batched`) when they can
        share one; otherwise one after another (with a one-line note, once per reason)."""
        starts = {client_id: decode_state(i.payload) for client_id, i in instructions.items()}
        jobs = [
            BatchedJob(
                self.clients[client_id],
                starts[client_id],
                resolve_settings(self.client, instruction.settings, self.precision, self.total_rounds),
                round_seed(self.run_seed, server_round, client_id),
                instruction.hooks,
                client_id,
            )
            for client_id, instruction in instructions.items()
        ]
        refusal = "model-heterogeneous clients have a model each" if self.client_models is not None else None
        if refusal is None and self.adapters.cfg.use_dora:
            refusal = "DoRA normalises each client's own weight"
        if refusal is None and jobs:
            refusal = batch_refusal(self.encoder, jobs)
        if refusal is not None or len(jobs) < 2:
            if refusal is not None and refusal not in self._batch_notes:
                self._batch_notes.add(refusal)
                log.warning("compute.batch_clients: %s; training these clients one at a time", refusal)
            return {c: self.train(server_round, c, i) for c, i in instructions.items()}
        results = train_clients_together(self.adapters, self.encoder, jobs, server_round, self.store)
        return {
            job.client_id: ClientReply(
                job.client_id,
                self.wire_reply(
                    job.client_id,
                    server_round,
                    instructions[job.client_id],
                    starts[job.client_id],
                    result.state,
                ),
                result.num_examples,
                with_peak_memory(result.metrics),
            )
            for job, result in zip(jobs, results, strict=True)
        }

    def train(self, server_round: int, client_id: int, instruction: ClientInstruction) -> ClientReply:
        """One client's local round from its instruction: the payload decoded from its wire form, the reply's
        tensors encoded in the instruction's ``wire_dtype`` (:mod:`fedlora.adapters.wire`)."""
        settings = resolve_settings(self.client, instruction.settings, self.precision, self.total_rounds)
        start = decode_state(instruction.payload)
        adapters, payload, encoder = self.adapters, start, self.encoder
        if self.client_models is not None:  # its own architecture, with its own weights and tokenizer
            adapters, payload = self.client_models.install(client_id, server_round, payload)
            encoder = self.client_models.encoder_of(client_id)
        result = train_locally(
            adapters,
            encoder,
            self.clients[client_id],
            payload,
            settings,
            round_seed(self.run_seed, server_round, client_id),
            instruction.hooks,
            client_id=client_id,
            server_round=server_round,
            store=self.store,
        )
        if self.client_models is not None:
            result.state = self.client_models.to_shared(result.state)
            self.client_models.save(client_id, server_round)
        state = self.wire_reply(client_id, server_round, instruction, start, result.state)
        return ClientReply(client_id, state, result.num_examples, with_peak_memory(result.metrics))

    def wire_reply(
        self,
        client_id: int,
        server_round: int,
        instruction: ClientInstruction,
        start: AdapterState,
        state: AdapterState,
    ) -> AdapterState:
        """The reply's tensors as they travel (:func:`fedlora.adapters.wire.encode_reply`: updates against
        ``start``, the payload as it arrived), with error feedback the residual read from and written to
        this client's personal store (versioned by round: a replayed round starts from the same residual)."""
        feedback = instruction.wire_error_feedback and instruction.wire_dtype != "fp32"
        if feedback and self.store is None:
            raise ValueError(
                "federation.wire_error_feedback keeps a residual per client: the node needs a store"
            )
        residual = (
            self.store.load(client_id, "wire-residual", server_round) if feedback and self.store else None
        )
        wire, error = encode_reply(state, start, instruction.wire_dtype, residual)
        if feedback and self.store is not None:
            self.store.save(client_id, "wire-residual", server_round, error)
        return wire
