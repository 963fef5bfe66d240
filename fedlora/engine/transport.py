"""What a round runs on and how it reaches its clients: the :class:`Simulation` (built once from the config),
the :class:`Transport` protocol and the in-process transport, and how a run is stopped."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fedlora.adapters.lora import LoraAdapters
from fedlora.client.node import ClientNode
from fedlora.client.steps import reporting_steps
from fedlora.compute import resolve_precision
from fedlora.config.schema import EvalConfig, ExperimentConfig, FaultsConfig, FederationConfig
from fedlora.data.encoding import Encoder
from fedlora.data.examples import Federation
from fedlora.engine.server import Server
from fedlora.errors import RunFailed, RunInterrupted
from fedlora.models.personal import ClientModels
from fedlora.protocol import ClientInstruction, ClientReply
from fedlora.strategies.base import Strategy


@dataclass(frozen=True)
class RoundPlan:
    """What the round loop follows, and nothing else of the config: who takes part and how many rounds
    (``federation``), the injected faults, what is evaluated when (``eval``), the local optimizer unless the
    method names its own (``client.optimizer``), threads, checkpoints kept, batched clients, precision."""

    federation: FederationConfig
    faults: FaultsConfig
    eval: EvalConfig
    optimizer: str | None = None
    num_threads: int = 1
    keep_checkpoints: int = 2
    batch_clients: bool = False
    precision: str = "fp32"

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> RoundPlan:
        return cls(
            cfg.federation,
            cfg.faults,
            cfg.eval,
            cfg.client.optimizer,
            cfg.client.num_threads,
            cfg.output.keep_checkpoints,
            cfg.compute.batch_clients,
            resolve_precision(cfg.compute.precision, cfg.compute.device),
        )


@dataclass
class Simulation:
    """Everything one experiment runs on, built once from the config (which stays with the composition
    layers: the engine reads the round plan, never the config)."""

    plan: RoundPlan
    federation: Federation
    adapters: LoraAdapters
    encoder: Encoder
    server: Server  # the method inside its wrappers (privacy, update-norm screening), and its state
    client_models: ClientModels | None = None  # model-heterogeneous clients (each with its own weights)
    node: ClientNode | None = None  # the clients, in this process (None: they live elsewhere)

    @property
    def strategy(self) -> Strategy:
        """The method's rules (inside its wrappers); its state is :attr:`server`'s."""
        return self.server.strategy


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
            where = f"round {server_round}: client {client_id} ({position}/{len(instructions)})"
            self.status(where)

            def on_step(done: int, total: int, where: str = where) -> None:
                self.status(f"{where}, step {done}/{total}")

            with reporting_steps(on_step):
                replies[client_id] = self.run_client(server_round, client_id, instruction)
        return replies


__all__ = [
    "InProcessTransport",
    "RoundPlan",
    "RunFailed",
    "RunInterrupted",
    "Simulation",
    "StopFlag",
    "Transport",
]
