"""The Flower transport: the round's instructions as Flower messages through a ``Grid``, one per client, and
the replies back (tensors as ``ArrayRecord``, the plan and counts as ``ConfigRecord``)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import torch

from fedlora.adapters.ranks import RankProfile
from fedlora.client.node import ClientNode
from fedlora.config.schema import FederationConfig
from fedlora.engine.deadline import ClientDeadline
from fedlora.engine.flower.secure import SecureRound
from fedlora.engine.sampling import clients_per_round
from fedlora.engine.transport import Simulation
from fedlora.errors import ConfigError
from fedlora.protocol import (
    ClientInstruction,
    ClientReply,
    is_assigned,
    read_reply,
    read_request,
    reply_header,
    request_header,
    wire_metrics,
)

log = logging.getLogger(__name__)


def metrics_record(metrics: dict[str, Any]) -> Any:
    """A reply's :func:`~fedlora.protocol.wire_metrics` as a Flower ``MetricRecord``."""
    from flwr.app import MetricRecord

    return MetricRecord({k: v if isinstance(v, list) else float(v) for k, v in wire_metrics(metrics).items()})


def to_arrays(state: dict[str, torch.Tensor]) -> Any:
    from flwr.app import ArrayRecord

    return ArrayRecord(torch_state_dict={k: v.detach().contiguous().cpu() for k, v in state.items()})


def from_arrays(record: Any) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def request_records(server_round: int, client_id: int, instruction: ClientInstruction, assigned: bool) -> Any:
    """A train request as the ``RecordDict`` the server sends: tensors as ``payload`` (ArrayRecord), round,
    client and plan as ``meta`` (ConfigRecord; ``assigned``: the node trains the client the message names)."""
    from flwr.app import ConfigRecord, RecordDict

    header = request_header(server_round, client_id, instruction, assigned)
    return RecordDict({"payload": to_arrays(instruction.payload), "meta": ConfigRecord(header)})


def read_request_records(content: Any) -> tuple[int, int, ClientInstruction, bool]:
    """(round, client, instruction, assigned) from :func:`request_records` (on the node)."""
    meta = content["meta"]
    server_round, client_id, instruction = read_request(meta, from_arrays(content["payload"]))
    return server_round, client_id, instruction, is_assigned(meta)


def reply_records(reply: ClientReply) -> Any:
    """A reply as the ``RecordDict`` the node returns: tensors, metrics (MetricRecord) and example count."""
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict(
        {
            "payload": to_arrays(reply.payload),
            "metrics": metrics_record(reply.metrics),
            "meta": ConfigRecord(dict[str, Any](reply_header(reply))),
        }
    )


def read_reply_records(client_id: int, content: Any) -> ClientReply:
    """The :class:`ClientReply` of client ``client_id`` from :func:`reply_records` (on the server)."""
    return read_reply(client_id, content["meta"], from_arrays(content["payload"]), content["metrics"])


class RecordsLoopback:
    """A transport that trains the clients on an in-process node, each request and reply crossing as the
    Flower ``RecordDict`` s above: Flower's encoding of every method's messages without its network (the
    conformance suite's ``flower`` check)."""

    def __init__(self, node: ClientNode) -> None:
        self.node = node

    def train_clients(
        self, server_round: int, instructions: dict[int, ClientInstruction]
    ) -> dict[int, ClientReply | str]:
        replies: dict[int, ClientReply | str] = {}
        for client_id, instruction in instructions.items():
            sent = request_records(server_round, client_id, instruction, assigned=True)
            round_seen, client_seen, received, _ = read_request_records(sent)
            reply = self.node.train(round_seen, client_seen, received)
            replies[client_id] = read_reply_records(client_id, reply_records(reply))
        return replies


#: how the server finds the node of a client: ``query`` asks every node once which partition it holds (and its
#: rank budget) before round 1 (deployment: a node holds its own data, one node per client); ``assigned``: the
#: nodes are slots holding the same federation (Flower's simulation: every ClientApp builds it from the same
#: config), as many as a round samples; the round's k-th client goes to the k-th node id in sorted order and
#: its message names the client, so no node is asked anything before a round
ROUTINGS = ("query", "assigned")


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
        node_keys: dict[int, str] | None = None,
    ) -> None:
        """``node_keys``: partition -> the public key of the SuperNode that may hold it (a deployment written
        with ``--tls``): a node must sign the query's nonce with it, or its claim is refused."""
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
        #: the last secure round's outcome (federation.secure_aggregation): what this process received
        self.last_secure_round: SecureRound | None = None
        self.deadline = ClientDeadline.of(sim.plan.federation)
        #: partition -> its node's public key (OpenSSH text): a node must prove it holds that key
        self.node_keys = dict(node_keys or {})
        num_clients = len(sim.federation.clients)
        if routing == "assigned":
            self.slots = sorted(
                self.wait_for_nodes(simulation_nodes(sim.plan.federation, num_clients), wait_for_nodes_s)
            )
            self.node_of: dict[int, int] = {}
        else:
            self.slots = []
            self.node_of = self.discover_clients(
                self.wait_for_nodes(num_clients, wait_for_nodes_s, at_least=1)
            )

    def wait_for_nodes(self, expected: int, timeout_s: float, at_least: int | None = None) -> list[int]:
        """The node ids once there are ``expected`` of them; at ``timeout_s`` those there are if they are
        ``at_least`` (default: all expected), else an error."""
        deadline = time.monotonic() + timeout_s
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < expected and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        if len(nodes) < (expected if at_least is None else at_least):
            raise ConfigError(f"flower: {len(nodes)} nodes connected, the federation needs {expected}")
        if len(nodes) < expected:
            log.warning(
                "flower: %d of the %d nodes connected in %.0f s; going on with them",
                len(nodes),
                expected,
                timeout_s,
            )
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

    def exchange(self, messages: list[Any]) -> tuple[list[tuple[Any, float]], float]:
        """Push ``messages`` and pull their replies until all are in or the client deadline passes (a stopped
        or unreachable node never hangs the round): each reply with its seconds since the push, and the
        deadline that applied."""
        limit = self.deadline.seconds()
        waiting = set(self.grid.push_messages(messages))
        interval = min(float(getattr(self.grid, "pull_interval", 0.5) or 0.5), 0.5)
        started = time.monotonic()
        replies: list[tuple[Any, float]] = []
        while waiting:
            for reply in self.grid.pull_messages(waiting):
                waiting.discard(reply.metadata.reply_to_message_id)
                replies.append((reply, time.monotonic() - started))
            if not waiting or time.monotonic() - started > limit:
                break
            time.sleep(interval)
        return replies, limit

    def discover_clients(self, nodes: list[int]) -> dict[int, int]:
        """QUERY every node: which partition (client id) it holds and, if given, its rank budget. A node that
        fails the query, claims a partition that does not exist or is taken, or cannot prove it holds the
        key bound to its partition is refused and logged; the run goes on with the others."""
        from flwr.app import ConfigRecord, Message, RecordDict

        expected = len(self.sim.federation.clients)
        nonce = secrets.token_hex(16)
        messages = [
            Message(
                content=RecordDict({"config": ConfigRecord({"nonce": nonce})}),
                dst_node_id=n,
                message_type="query",
            )
            for n in nodes
        ]
        node_of: dict[int, int] = {}
        largest = self._largest_profile()
        for reply, _ in self.exchange(messages)[0]:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("flower: node %s refused: it failed the query (%s)", node, reply.error.reason)
                continue
            info = reply.content["profile"]
            client = int(info["partition-id"])
            if not 0 <= client < expected:
                log.warning("flower: node %s refused: it claims partition %d of %d", node, client, expected)
                continue
            if client in node_of:
                log.warning(
                    "flower: node %s refused: partition %d is already held by node %s",
                    node,
                    client,
                    node_of[client],
                )
                continue
            problem = self.key_problem(client, nonce, info)
            if problem is not None:
                log.warning("flower: node %s refused: %s", node, problem)
                continue
            size = int(info["num-examples"]) if "num-examples" in info else None
            profile = None
            if "rank-attention" in info:  # the node's own rank budget (deployment --node-config)
                profile = RankProfile(int(info["rank-attention"]), int(info["rank-mlp"]))
                if profile.attention > largest.attention or profile.mlp > largest.mlp:
                    log.warning(
                        "flower: node %s refused: client %d reports rank %s, above the largest rank the server "
                        "was configured for (%s); raise resources.rank_types",
                        node,
                        client,
                        profile.name,
                        largest.name,
                    )
                    continue
            node_of[client] = node
            # fixed at registration: later replies cannot claim more examples
            self.sim.server.register_client(client, size, profile)
        if not node_of:
            raise ConfigError(
                f"flower: none of the {len(nodes)} nodes holds a usable partition (see the log)"
            )
        missing = sorted(set(range(expected)) - set(node_of))
        if missing:
            log.warning(
                "flower: no node holds partition(s) %s; those clients get no reply when sampled", missing[:10]
            )
        return node_of

    def key_problem(self, client: int, nonce: str, info: dict[str, Any]) -> str | None:
        """Why a node's claim of partition ``client`` is not proven (None: proven, or no keys are bound): it
        must sign this query's nonce with the private key whose public half is bound to that partition."""
        if not self.node_keys:
            return None
        from fedlora.engine.flower.tls import verify_claim

        public = self.node_keys.get(client)
        if public is None:
            return f"no key is bound to partition {client}"
        signature = str(info.get("signature", ""))
        if not verify_claim(public, nonce, client, signature):
            return (
                f"it claims partition {client} without that partition's key (the signature does not verify)"
            )
        return None

    def _largest_profile(self) -> RankProfile:
        profiles = list(self.sim.server.client_profiles.values())
        return RankProfile(max(p.attention for p in profiles), max(p.mlp for p in profiles))

    def train_clients(
        self, server_round: int, instructions: dict[int, ClientInstruction]
    ) -> dict[int, ClientReply | str]:
        from flwr.app import Message

        self.status(f"round {server_round}: {len(instructions)} clients training on their nodes")
        sent: dict[int, int] = {}  # node -> client
        unreachable: dict[int, str] = {}
        for position, client_id in enumerate(instructions):
            if not self.slots and client_id not in self.node_of:
                unreachable[client_id] = "no node holds this client's partition: no reply"
                continue
            sent[self.node_for(position, client_id)] = client_id
        replies: dict[int, ClientReply | str] = dict(unreachable)
        if self.sim.plan.federation.secure_aggregation:
            replies.update(self.train_securely(server_round, instructions, sent))
            return replies
        messages = [
            Message(
                content=request_records(
                    server_round, client, instructions[client], self.routing == "assigned"
                ),
                dst_node_id=node,
                message_type="train",
                group_id=str(server_round),
            )
            for node, client in sent.items()
        ]
        answered, limit = self.exchange(messages)
        for reply, seconds in answered:
            sender = sent.get(reply.metadata.src_node_id)
            if sender is None:
                continue
            self.deadline.record(seconds)
            if reply.has_error():
                replies[sender] = f"client error: {reply.error.reason}"
                continue
            replies[sender] = read_reply_records(sender, reply.content)
        for client_id in sent.values():
            if client_id not in replies:
                replies[client_id] = self.deadline.reason(limit)
        return replies

    def train_securely(
        self, server_round: int, instructions: dict[int, ClientInstruction], sent: dict[int, int]
    ) -> dict[int, ClientReply | str]:
        """The round through SecAgg+ (:mod:`fedlora.engine.flower.secure`): every replying client's reply
        carries the example-weighted average of the round's replies as its payload; no client's own reaches
        this process. Each of the protocol's four stages waits at most the client deadline."""
        from fedlora.engine.flower.secure import fit_instruction, secure_average, secure_replies
        from fedlora.strategies.base import expected_reply

        assigned = self.routing == "assigned"
        requests = {
            node: fit_instruction(server_round, client, instructions[client], assigned)
            for node, client in sent.items()
        }
        sizes = self.sim.server.setup.client_sizes or {}
        weights = [sizes[c] for c in sent.values() if sizes.get(c)]
        max_weight = float(max(weights)) if len(weights) == len(sent) else 1000.0  # Flower's default
        if all(any(h.equal_weight for h in instructions[c].hooks) for c in sent.values()):
            max_weight = 1.0  # every reply weighs 1 (client-level DP)
        limit = self.deadline.seconds()
        started = time.monotonic()
        outcome = secure_average(
            self.grid, server_round, requests, self.sim.plan.federation, max_weight, limit
        )
        seconds = time.monotonic() - started
        self.last_secure_round = outcome  # what the server received, for inspection
        expected = {client: expected_reply(instructions[client]) for client in sent.values()}
        replies = secure_replies(outcome, sent, expected)
        for node, client in sent.items():
            if client in replies:
                self.deadline.record(seconds)
            elif node in outcome.counts.errors:
                replies[client] = f"client error: {outcome.counts.errors[node]}"
            elif outcome.average is None:
                replies[client] = "secure aggregation halted: too few clients answered to unmask the sum"
            else:
                replies[client] = self.deadline.reason(limit)
        return replies
