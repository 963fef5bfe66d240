"""Strategy wrappers: cross-cutting features that wrap ANY strategy, like Flower's
``DifferentialPrivacyClientSideFixedClipping(strategy)``.

A wrapper is a :class:`Strategy` that holds another and forwards every hook to it, changing only what its
feature needs: :class:`~fedlora.strategies.privacy.DifferentialPrivacy` adds each client's DP-SGD plan to its
instruction and keeps the privacy ledger; :class:`~fedlora.strategies.robustness.UpdateNormScreen` rejects or
clips updates by norm. Attribute reads and writes that the wrapper does not own reach the wrapped strategy,
so engines and tests see one strategy whatever is wrapped around it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedlora.adapters.ranks import RankProfile
from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientHooks
from fedlora.strategies.base import ClientInstruction, ClientReply, ServerSetup, Strategy, StrategyOptions


class StrategyWrapper(Strategy[StrategyOptions]):
    """Forwards every hook to ``inner``; subclasses override what their feature changes."""

    _own: ClassVar[frozenset[str]] = frozenset({"inner"})

    def __init__(self, inner: Strategy) -> None:  # no super().__init__: the state is the inner strategy's
        object.__setattr__(self, "inner", inner)

    # attributes: everything not owned by the wrapper is the inner strategy's
    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._own or any(name in cls.__dict__ for cls in type(self).__mro__[:-2]):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    # class-level facts of the wrapped method (found on Strategy otherwise, before __getattr__ is asked)
    name = property(lambda self: self.inner.name)  # type: ignore[assignment]
    Options = property(lambda self: self.inner.Options)  # type: ignore[assignment]
    default_optimizer = property(lambda self: self.inner.default_optimizer)  # type: ignore[assignment]
    trains_full_model = property(lambda self: self.inner.trains_full_model)  # type: ignore[assignment]
    communicates = property(lambda self: self.inner.communicates)  # type: ignore[assignment]
    shares_local_model = property(lambda self: self.inner.shares_local_model)  # type: ignore[assignment]
    personal_models = property(lambda self: self.inner.personal_models)  # type: ignore[assignment]
    linear_aggregate = property(lambda self: self.inner.linear_aggregate)  # type: ignore[assignment]

    def initialize(self, setup: ServerSetup) -> None:
        self.inner.initialize(setup)

    def register_client(
        self, client_id: int, num_examples: int | None = None, profile: RankProfile | None = None
    ) -> None:
        self.inner.register_client(client_id, num_examples, profile)

    def client_hooks(self) -> list[ClientHooks]:
        return self.inner.client_hooks()

    def configure(self, server_round: int, client_ids: list[int]) -> dict[int, ClientInstruction]:
        return self.inner.configure(server_round, client_ids)

    def validate_reply(self, instruction: ClientInstruction, reply: ClientReply) -> str | None:
        return self.inner.validate_reply(instruction, reply)

    def screen(self, replies: list[ClientReply]) -> tuple[list[ClientReply], list[tuple[int, str]]]:
        return self.inner.screen(replies)

    def aggregate(self, server_round: int, replies: list[ClientReply]) -> AdapterState:
        return self.inner.aggregate(server_round, replies)

    def round_metrics(self) -> dict[str, float]:
        return self.inner.round_metrics()

    def report(self) -> list[str]:
        return self.inner.report()

    def evaluation_state(self) -> AdapterState:
        return self.inner.evaluation_state()

    def extra_evaluation_states(self) -> dict[str, AdapterState]:
        return self.inner.extra_evaluation_states()

    def personal_state(self, client_id: int) -> AdapterState:
        return self.inner.personal_state(client_id)

    def server_state(self) -> dict[str, torch.Tensor]:
        return self.inner.server_state()

    def load_server_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.inner.load_server_state(tensors)

    def server_meta(self) -> dict[str, Any]:
        return self.inner.server_meta()

    def load_server_meta(self, meta: dict[str, Any]) -> None:
        self.inner.load_server_meta(meta)
