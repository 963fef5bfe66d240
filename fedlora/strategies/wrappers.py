"""Strategy wrappers: cross-cutting features that wrap ANY strategy, like Flower's
``DifferentialPrivacyClientSideFixedClipping(strategy)``.

A wrapper is a :class:`Strategy` that holds another and delegates every hook to it explicitly, changing only
what its feature needs: :class:`~fedlora.strategies.privacy.DifferentialPrivacy` adds each client's DP-SGD plan
to its instruction and keeps the privacy ledger in the state's facts; :class:`~fedlora.strategies.robustness.UpdateNormScreen`
rejects or clips updates by norm. The wrapper and the method share one :class:`ServerState`; a wrapper keeps
its own entries under facts of its own names. The class facts engines read (:data:`STRATEGY_FACTS`) are the
wrapped method's, copied at construction, so a new fact needs no edit here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.adapters.ranks import RankProfile
from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientHooks
from fedlora.strategies.base import (
    STRATEGY_FACTS,
    ClientInstruction,
    ClientReply,
    Review,
    RoundResults,
    ServerSetup,
    ServerState,
    Strategy,
    StrategyOptions,
)

if TYPE_CHECKING:
    from fedlora.adapters.lora import LoraAdapters
    from fedlora.models.personal import ClientModels


class StrategyWrapper(Strategy[StrategyOptions]):
    """Delegates every hook to ``inner``; subclasses override what their feature changes."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        for fact in STRATEGY_FACTS:  # what engines read of the method is the wrapped method's
            setattr(self, fact, getattr(inner, fact))

    @property
    def options(self) -> StrategyOptions:  # type: ignore[override]  # read-only: the wrapped method's
        return self.inner.options

    @property
    def setup(self) -> ServerSetup:  # type: ignore[override]  # read-only: the wrapped method's
        return self.inner.setup

    def initial_adapter(self, adapters: LoraAdapters, profile: RankProfile) -> AdapterState:
        return self.inner.initial_adapter(adapters, profile)

    def initial_personal_state(self, client_models: ClientModels) -> AdapterState:
        return self.inner.initial_personal_state(client_models)

    def initialize(self, setup: ServerSetup) -> ServerState:
        return self.inner.initialize(setup)

    def client_hooks(self, state: ServerState) -> list[ClientHooks]:
        return self.inner.client_hooks(state)

    def configure_round(
        self, state: ServerState, server_round: int, client_ids: list[int]
    ) -> dict[int, ClientInstruction]:
        return self.inner.configure_round(state, server_round, client_ids)

    def review(self, state: ServerState, server_round: int, results: RoundResults) -> Review:
        return self.inner.review(state, server_round, results)

    def check(self, state: ServerState, instruction: ClientInstruction, reply: ClientReply) -> str | None:
        return self.inner.check(state, instruction, reply)

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        return self.inner.aggregate(state, server_round, replies)

    def round_metrics(self, state: ServerState) -> dict[str, float]:
        return self.inner.round_metrics(state)

    def evaluation_state(self, state: ServerState) -> AdapterState:
        return self.inner.evaluation_state(state)

    def extra_evaluation_states(self, state: ServerState) -> dict[str, AdapterState]:
        return self.inner.extra_evaluation_states(state)

    def personal_state(self, state: ServerState, client_id: int) -> AdapterState:
        return self.inner.personal_state(state, client_id)

    def report(self, state: ServerState) -> list[str]:
        return self.inner.report(state)
