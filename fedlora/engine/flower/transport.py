"""The Flower transport: the round's instructions as Flower messages through a ``Grid``, one per client, and
the replies back (tensors as ``ArrayRecord``, the plan and counts as ``ConfigRecord``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from fedlora.adapters.ranks import RankProfile
from fedlora.config.schema import FederationConfig
from fedlora.engine.sampling import clients_per_round
from fedlora.engine.transport import Simulation
from fedlora.errors import ConfigError
from fedlora.protocol import (
    ClientInstruction,
    ClientReply,
    read_reply,
    request_header,
    wire_metrics,
)

log = logging.getLogger(__name__)


def metrics_record(metrics: dict[str, Any]) -> Any:
    """A reply's :func:`~fedlora.protocol.wire_metrics` as a Flower ``MetricRecord``."""
    from flwr.app import MetricRecord

    return MetricRecord({k: float(v) for k, v in wire_metrics(metrics).items()})


def to_arrays(state: dict[str, torch.Tensor]) -> Any:
    from flwr.app import ArrayRecord

    return ArrayRecord(torch_state_dict={k: v.detach().contiguous().cpu() for k, v in state.items()})


def from_arrays(record: Any) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


#: how the server finds the node of a client: ``query`` asks every node once which partition it holds (and its
#: rank budget) before round 1 (deployment: a node holds its own data, one node per client); ``assigned``: the
#: nodes are slots holding the same federation (Flower's simulation: every ClientApp builds it from the same
#: config), as many as a round samples; the round's k-th client goes to the k-th node id in sorted order and
#: its message names the client, so no node is asked anything before a round
ROUTINGS = ("query", "assigned")

#: the request key saying that the node trains the client the message names (``assigned`` routing)
ASSIGNED_KEY = "assigned-client"


def simulation_nodes(fed: FederationConfig, num_clients: int) -> int:
    """The SuperNodes a simulation with ``assigned`` routing runs: one per client a round samples."""
    return clients_per_round(fed, num_clients)


class FlowerTransport:
    """Reaches the sampled clients through a Flower ``Grid``: one message per client and round.

    ``routing`` (:data:`ROUTINGS`): ``query`` needs one node per client and costs one message per node before
    round 1, and Flower's simulation dispatches messages in O(nodes x messages) (every 0.1 s its in-memory state
    is asked for each node's messages, and each ask scans every stored message): asking 10,000 virtual nodes
    took 446 s. ``assigned`` runs :func:`simulation_nodes` slots and sends a round's messages only: its cost
    does not grow with the number of clients."""

    def __init__(
        self,
        sim: Simulation,
        grid: Any,
        status: Callable[[str], None] | None = None,
        wait_for_nodes_s: float = 120.0,
        routing: str = "query",
    ) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing {routing!r}: one of {', '.join(ROUTINGS)}")
        if sim.client_models is not None:
            raise ConfigError(
                "engine flower: model-heterogeneous clients (model.variants) run on the embedded engine only"
            )
        self.sim = sim
        self.grid = grid
        if isinstance(getattr(grid, "pull_interval", None), float):  # the simulation's in-memory grid polls
            grid.pull_interval = min(grid.pull_interval, 0.01)  # for replies every 0.1 s by default
        self.status = status or (lambda text: None)
        self.routing = routing
        num_clients = len(sim.federation.clients)
        if routing == "assigned":
            self.slots = sorted(
                self.wait_for_nodes(simulation_nodes(sim.cfg.federation, num_clients), wait_for_nodes_s)
            )
            self.node_of: dict[int, int] = {}
        else:
            self.slots = []
            self.node_of = self.discover_clients(self.wait_for_nodes(num_clients, wait_for_nodes_s))

    def wait_for_nodes(self, expected: int, timeout_s: float) -> list[int]:
        """The node ids once there are ``expected`` of them (or an error at ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < expected and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        if len(nodes) < expected:
            raise ConfigError(f"flower: {len(nodes)} nodes connected, the federation needs {expected}")
        return nodes

    def node_for(self, position: int, client_id: int) -> int:
        """The node of a round's ``position``-th client."""
        if not self.slots:
            return self.node_of[client_id]
        if position >= len(self.slots):
            raise RuntimeError(
                f"flower: more clients in a round than the simulation's {len(self.slots)} nodes"
            )
        return self.slots[position]

    def discover_clients(self, nodes: list[int]) -> dict[int, int]:
        """QUERY every node: which partition (client id) it holds and, if given, its rank budget."""
        from flwr.app import ConfigRecord, Message, RecordDict

        expected = len(self.sim.federation.clients)
        messages = [
            Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query")
            for n in nodes
        ]
        node_of: dict[int, int] = {}
        largest = self._largest_profile()
        for reply in self.grid.send_and_receive(messages):
            if reply.has_error():
                raise RuntimeError(f"flower: a node failed the query: {reply.error}")
            info = reply.content["profile"]
            client = int(info["partition-id"])
            node = reply.metadata.src_node_id
            if not 0 <= client < expected:
                log.warning("flower: node %s claims unknown partition %d; ignored", node, client)
                continue
            if client in node_of:
                log.warning(
                    "flower: node %s claims partition %d, already held by node %s; ignored",
                    node,
                    client,
                    node_of[client],
                )
                continue
            node_of[client] = node
            size = int(info["num-examples"]) if "num-examples" in info else None
            profile = None
            if "rank-attention" in info:  # the node's own rank budget (deployment --node-config)
                profile = RankProfile(int(info["rank-attention"]), int(info["rank-mlp"]))
                if profile.attention > largest.attention or profile.mlp > largest.mlp:
                    raise ConfigError(
                        f"flower: client {client} reports rank {profile.name}, above the largest rank the "
                        f"server was configured for ({largest.name}); raise resources.rank_types"
                    )
            # fixed at registration: later replies cannot claim more examples
            self.sim.strategy.register_client(client, size, profile)
        missing = sorted(set(range(expected)) - set(node_of))
        if missing:
            raise ConfigError(f"flower: no node holds partition(s) {missing[:5]}")
        return node_of

    def _largest_profile(self) -> RankProfile:
        profiles = list(self.sim.strategy.client_profiles.values())
        return RankProfile(max(p.attention for p in profiles), max(p.mlp for p in profiles))

    def train_clients(
        self, server_round: int, instructions: dict[int, ClientInstruction]
    ) -> dict[int, ClientReply | str]:
        from flwr.app import ConfigRecord, Message, RecordDict

        self.status(f"round {server_round}: {len(instructions)} clients training on their nodes")
        sent: dict[int, int] = {}  # node -> client
        messages = []
        for position, (client_id, instruction) in enumerate(instructions.items()):
            node = self.node_for(position, client_id)
            sent[node] = client_id
            header = request_header(server_round, client_id, instruction)
            if self.routing == "assigned":
                header[ASSIGNED_KEY] = True
            content = RecordDict({"payload": to_arrays(instruction.payload), "meta": ConfigRecord(header)})
            messages.append(
                Message(content=content, dst_node_id=node, message_type="train", group_id=str(server_round))
            )
        replies: dict[int, ClientReply | str] = {}
        for reply in self.grid.send_and_receive(messages):
            client_id = sent.get(reply.metadata.src_node_id)
            if client_id is None:
                continue
            if reply.has_error():
                replies[client_id] = f"client error: {reply.error.reason}"
                continue
            content = reply.content
            replies[client_id] = read_reply(
                client_id, content["meta"], from_arrays(content["payload"]), content["metrics"]
            )
        return replies
