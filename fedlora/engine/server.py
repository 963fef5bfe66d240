"""The server side of a run: a strategy's rules and the :class:`ServerState` the engine owns.

The engine creates the state from the strategy (``initialize``), passes it into every hook, keeps what a hook
returns and checkpoints it whole: every group of tensors as ``<group>/<name>`` in one safetensors file, the
facts, each client's rank profile and each group's key order as JSON beside it (:meth:`Server.checkpoint`).
A restored state is the saved one bit for bit, whatever the method, so no method writes persistence code.
Every engine (embedded, worker processes, Flower) drives the round through this one object.
"""

from __future__ import annotations

from typing import Any

import torch

from fedlora.adapters.ranks import RankProfile
from fedlora.adapters.state import AdapterState
from fedlora.engine.checkpoint import CheckpointError
from fedlora.protocol import ClientInstruction, ClientReply
from fedlora.strategies.base import GLOBAL, Review, RoundResults, ServerSetup, ServerState, Strategy

#: the checkpoint metadata's key for the JSON side of the state
STATE_META = "server_state"


class StateFormatError(CheckpointError):
    """A checkpoint's server state that this version cannot restore (named in the message)."""


def state_to_tensors(state: ServerState) -> dict[str, torch.Tensor]:
    """Every tensor of the state under ``<group>/<name>`` (group names hold no ``/``)."""
    out = {}
    for group, tensors in state.arrays.items():
        if "/" in group:
            raise ValueError(f"server state group {group!r}: a group name may not contain '/'")
        out.update({f"{group}/{name}": tensor for name, tensor in tensors.items()})
    return out


def state_to_json(state: ServerState) -> dict[str, Any]:
    """The JSON side of the state: facts, profiles ({client: [attention, mlp]}) and each group's key order."""
    return {
        "facts": dict(state.facts),
        "profiles": {str(c): [p.attention, p.mlp] for c, p in state.profiles.items()},
        "groups": {group: list(tensors) for group, tensors in state.arrays.items()},
    }


def state_from_checkpoint(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> ServerState:
    """The state :func:`state_to_tensors` and :func:`state_to_json` wrote (the JSON under ``server_state``)."""
    side = meta.get(STATE_META)
    if not isinstance(side, dict) or not {"facts", "profiles", "groups"} <= side.keys():
        raise StateFormatError(
            "the checkpoint holds no server state in this version's format (written by an older fedlora?): "
            "start the run again, or resume it with the version that wrote it"
        )
    arrays: dict[str, AdapterState] = {}
    for group, names in side["groups"].items():
        try:
            arrays[group] = {name: tensors[f"{group}/{name}"] for name in names}
        except KeyError as err:
            raise StateFormatError(f"the checkpoint's server state lacks tensor {err.args[0]}") from None
    profiles = {int(c): RankProfile(int(p[0]), int(p[1])) for c, p in side["profiles"].items()}
    return ServerState(arrays, dict(side["facts"]), profiles)


class Server:
    """A strategy and its state: the engine's one handle on the server side of a federation."""

    def __init__(self, strategy: Strategy, setup: ServerSetup) -> None:
        self.strategy = strategy
        self.state: ServerState = strategy.initialize(setup)

    @property
    def setup(self) -> ServerSetup:
        return self.strategy.setup

    @property
    def global_state(self) -> AdapterState:
        """The global adapter (the state's ``global`` group), read-only."""
        return self.state.adapter

    @property
    def client_profiles(self) -> dict[int, RankProfile]:
        """Each client's current rank profile."""
        return dict(self.state.profiles)

    def register_client(
        self, client_id: int, num_examples: int | None = None, profile: RankProfile | None = None
    ) -> None:
        """Learn a client after the start (a Flower node's registration): its size and its rank profile."""
        self.setup.register_client(client_id, num_examples, profile)
        if profile is not None:
            self.state = self.state.evolve(profiles={client_id: profile})

    # --- the round ---------------------------------------------------------------------------------------

    def configure(self, server_round: int, client_ids: list[int]) -> dict[int, ClientInstruction]:
        return self.strategy.configure_round(self.state, server_round, client_ids)

    def review(self, server_round: int, results: RoundResults) -> Review:
        """The strategy's review of the round's replies; its state becomes the server's."""
        review = self.strategy.review(self.state, server_round, results)
        self.state = review.state
        return review

    def validate_reply(
        self, instruction: ClientInstruction, reply: ClientReply, server_round: int = 1
    ) -> str | None:
        """One reply alone through :meth:`review`: None if accepted, else why not."""
        review = self.review(server_round, [(instruction, reply)])
        return review.rejected[0][1] if review.rejected else None

    def aggregate(self, server_round: int, replies: list[ClientReply]) -> AdapterState:
        """The strategy's aggregation; returns the new global adapter (the ``global`` group)."""
        self.state = self.strategy.aggregate(self.state, server_round, replies)
        return self.state.adapter

    def round_metrics(self) -> dict[str, float]:
        return self.strategy.round_metrics(self.state)

    # --- the result ----------------------------------------------------------------------------------------

    def evaluation_state(self) -> AdapterState:
        return self.strategy.evaluation_state(self.state)

    def extra_evaluation_states(self) -> dict[str, AdapterState]:
        return self.strategy.extra_evaluation_states(self.state)

    def personal_state(self, client_id: int) -> AdapterState:
        return self.strategy.personal_state(self.state, client_id)

    def report(self) -> list[str]:
        return self.strategy.report(self.state)

    # --- persistence (the engine's, for every method) -----------------------------------------------------

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, metadata) of the whole state, for :func:`fedlora.engine.checkpoint.save_checkpoint`."""
        return state_to_tensors(self.state), {STATE_META: state_to_json(self.state)}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (the configuration, :attr:`setup`, is the run's own)."""
        self.state = state_from_checkpoint(tensors, meta)

    def load_global_adapter(self, adapter: AdapterState) -> None:
        """Replace the global adapter alone (evaluating an exported adapter without a checkpoint)."""
        self.state = self.state.evolve({GLOBAL: dict(adapter)})
