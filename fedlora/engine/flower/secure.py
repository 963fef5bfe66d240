"""Secure aggregation on Flower (``federation.secure_aggregation: true``): Flower's SecAgg+ protocol, so that
the server process holds only the example-weighted average of a round's replies, never one client's.

SecAgg+ (Bell et al. 2020, "Secure single-server aggregation with (poly)logarithmic overhead"; Flower's
``SecAggPlusWorkflow`` on the server and ``secaggplus_mod`` on the ClientApp, read in flwr 1.41). Client i of
the round's m, with reply x_i (all tensors as one vector) and weight n_i (its example count), sends

    y_i = Q(x_i q_i / T) + r_i + sum_{j > i} s_ij - sum_{j < i} s_ij        (mod 2^32),   q_i = round(n_i / W * T)

where Q clips to [-c, c] and quantises to T levels by stochastic rounding (c:
``federation.secagg_clipping_range``, T: ``secagg_quantization_range``, W: the largest example count of the
round's clients), r_i is a private mask and s_ij = -s_ji pairwise masks from Diffie-Hellman keys. Secret shares
of r_i and of the key of s_ij go to ``secagg_num_shares`` neighbours, ``secagg_reconstruction_threshold`` of
which rebuild them: the masks of the clients that replied (r_i) and those of the clients that dropped out after
sharing (their s_ij) are removed, and the server learns sum_i y_i = sum_i Q(x_i q_i / T) alone. Dequantised,
with the weight q_i carried as one more quantised entry (n_i is the example count, or 1 for every client
under client-level DP, whose clients clip their own updates: :mod:`fedlora.client.clipping`), that is

    x_avg = sum_i q_i x_i / sum_i q_i

up to the quantisation: each client's entries are within one step 2c / T of x_i q_i / T, so each entry of
x_avg is within m (2c / T) T / sum_i q_i of the exact weighted average (tested), and values beyond [-c, c] are
clipped. fedlora hands every reply's metadata (its example count and metrics, which SecAgg+ leaves in the clear)
with x_avg as its payload to the method, as Flower does with ``FitRes.parameters``: an example-weighted
average of m copies of x_avg is x_avg, so a method whose aggregate is such an average (``linear_aggregate``)
aggregates exactly what it would have from the replies, and the others are refused by the preflight.

fedlora's request and reply travel as the legacy ``FitIns`` / ``FitRes`` records the protocol wraps (tensors in
sorted key order as numpy arrays, the plan and metrics as JSON text; no pickle); the per-client update-norm
screens are off (there is no reply to screen); the stochastic rounding is seeded by (round, client, plan), so
a run and its resume give the same aggregate. Bytes: each client's ``bytes_up`` is everything it sent in the
four stages (public keys, encrypted shares, the masked vector as int64 entries: about twice float32, and the
unmasking shares); ``secagg_bytes_down`` what the protocol sent it beside its payload.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedlora.adapters.state import AdapterState
from fedlora.config.schema import FederationConfig
from fedlora.protocol import (
    ClientInstruction,
    ClientReply,
    is_assigned,
    plan_to_json,
    read_request,
    request_header,
    wire_metrics,
)

#: FitRes metrics: the reply's tensor names in the order of its arrays, and its metrics (JSON text)
KEYS_METRIC = "fedlora-keys"
METRICS_METRIC = "fedlora-metrics"
#: FitRes metrics: the reply's example count (its FitRes.num_examples is its weight in SecAgg+'s sum)
EXAMPLES_METRIC = "fedlora-examples"
#: FitIns config: the tensor names of the request's arrays (JSON)
REQUEST_KEYS = "fedlora-keys"
#: the record names Flower's compat layer gives a FitIns / FitRes
FITINS_PARAMETERS = "fitins.parameters"


def to_ndarrays(state: AdapterState) -> tuple[list[str], list[np.ndarray]]:
    """The tensors in sorted key order as float32 / their own numpy dtype (bf16 as float32)."""
    keys = sorted(state)
    arrays = []
    for key in keys:
        tensor = state[key].detach().cpu()
        arrays.append((tensor.float() if tensor.dtype == torch.bfloat16 else tensor).contiguous().numpy())
    return keys, arrays


def from_ndarrays(
    keys: list[str], arrays: list[np.ndarray], like: AdapterState | None = None
) -> AdapterState:
    """``{key: tensor}``; with ``like``, each in the dtype of ``like[key]`` and in ``like``'s key order (what
    a reply that did not travel sorted would be: a rule that walks the tensors in order, such as client-level
    DP's noise, sees them as it would in process)."""
    out: AdapterState = {}
    for key, array in zip(keys, arrays, strict=True):
        tensor = torch.from_numpy(np.array(array))
        out[key] = tensor.to(like[key].dtype) if like is not None and key in like else tensor
    if like is None:
        return out
    return {**{k: out[k] for k in like if k in out}, **{k: v for k, v in out.items() if k not in like}}


def fit_instruction(server_round: int, client_id: int, instruction: ClientInstruction, assigned: bool) -> Any:
    """A train request as a legacy ``FitIns``: the payload as parameters, round, client and plan as config."""
    from flwr.common import FitIns, ndarrays_to_parameters

    keys, arrays = to_ndarrays(instruction.payload)
    config = {
        **request_header(server_round, client_id, instruction, assigned),
        REQUEST_KEYS: json.dumps(keys),
    }
    return FitIns(ndarrays_to_parameters(arrays), config)


def is_fit_request(content: Any) -> bool:
    """Whether a train message is a secure round's request (the FitIns records) rather than fedlora's own."""
    return FITINS_PARAMETERS in content.array_records


def read_fit_request(content: Any) -> tuple[int, int, ClientInstruction, bool]:
    """(round, client, instruction, assigned) from :func:`fit_instruction`'s records (on the node)."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    parameters = compat.arrayrecord_to_parameters(content.array_records[FITINS_PARAMETERS], keep_input=True)
    config = content.config_records["fitins.config"]
    payload = from_ndarrays(json.loads(str(config[REQUEST_KEYS])), parameters_to_ndarrays(parameters))
    server_round, client_id, instruction = read_request(config, payload)
    return server_round, client_id, instruction, is_assigned(config)


def fit_reply_records(server_round: int, reply: ClientReply, instruction: ClientInstruction) -> Any:
    """A reply as the legacy ``FitRes`` records SecAgg+'s client side masks (tensors in sorted key order, the
    example count as the weight, names and metrics as JSON text). Seeds numpy's generator, which SecAgg+'s
    stochastic rounding draws from, by (round, client, plan): the same reply is quantised the same way."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    keys, arrays = to_ndarrays(reply.payload)
    metrics = {
        KEYS_METRIC: json.dumps(keys),
        METRICS_METRIC: json.dumps(wire_metrics(reply.metrics)),
        EXAMPLES_METRIC: reply.num_examples,
    }
    # the weight SecAgg+ multiplies by: the example count, or 1 when every reply weighs the same (client DP)
    weight = 1 if any(hook.equal_weight for hook in instruction.hooks) else reply.num_examples
    np.random.seed(zlib.crc32(f"{server_round}:{reply.client_id}:{plan_to_json(instruction)}".encode()))
    result = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), weight, metrics)  # type: ignore[arg-type]
    return compat.fitres_to_recorddict(result, keep_input=True)


def secure_aggregation_mod(msg: Any, context: Any, call_next: Any) -> Any:
    """Flower's ``secaggplus_mod`` for the messages of a secure round (they carry its stage), a pass-through
    for every other message: one ClientApp serves plain and secure runs."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def content_bytes(content: Any, arrays: bool = True) -> int:
    """The bytes a message's records carry: array data (unless ``arrays`` is False), and bytes / text /
    numbers in its config records."""
    total = 0
    for record in content.array_records.values() if arrays else ():
        total += sum(len(array.data) for array in record.values())
    for record in content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, (bytes, str)) else 8
    return total


def counting_grid(grid: Any, counts: ProtocolBytes) -> Any:
    """``grid`` with its ``send_and_receive`` counting each node's bytes both ways into ``counts`` (all that
    SecAgg+'s workflow calls on a grid)."""
    from flwr.serverapp.grid import Grid

    class CountingGrid(Grid):
        def set_run(self, run: Any) -> None:
            grid.set_run(run)

        @property
        def run(self) -> Any:
            return grid.run

        def create_message(self, *args: Any, **kwargs: Any) -> Any:
            return grid.create_message(*args, **kwargs)

        def get_node_ids(self) -> Iterable[int]:
            return grid.get_node_ids()

        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
            return grid.push_messages(messages)

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
            return grid.pull_messages(message_ids)

        def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
            messages = list(messages)
            for message in messages:
                # the payload (a FitIns' arrays) is the engine's bytes_down; the protocol's own records here
                counts.add_down(message.metadata.dst_node_id, content_bytes(message.content, arrays=False))
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            for reply in replies:
                if reply.has_error():
                    counts.errors[reply.metadata.src_node_id] = reply.error.reason
                else:
                    counts.add_up(reply.metadata.src_node_id, content_bytes(reply.content))
                    counts.replies.append(reply.content)
            return replies

    return CountingGrid()


@dataclass
class ProtocolBytes:
    """What each node sent (up) and was sent by the protocol (down: keys, shares, the plan; not the payload)
    over a secure round, every reply's content as the server
    received it (what the tests inspect: no reply holds a tensor), and the nodes' errors."""

    up: dict[int, int] = field(default_factory=dict)
    down: dict[int, int] = field(default_factory=dict)
    replies: list[Any] = field(default_factory=list)
    #: node -> the reason of its error reply (a ClientApp that raised)
    errors: dict[int, str] = field(default_factory=dict)

    def add_up(self, node: int, size: int) -> None:
        self.up[node] = self.up.get(node, 0) + size

    def add_down(self, node: int, size: int) -> None:
        self.down[node] = self.down.get(node, 0) + size


@dataclass
class SecureRound:
    """One round's outcome: each node's legacy ``FitRes`` (metadata and metrics; its parameters are the
    average), the average itself (None when the protocol halted) and the bytes."""

    results: dict[int, Any]
    average: list[np.ndarray] | None
    counts: ProtocolBytes


def secure_average(
    grid: Any,
    server_round: int,
    requests: dict[int, Any],
    fed: FederationConfig,
    max_weight: float,
    timeout: float | None,
) -> SecureRound:
    """Run SecAgg+ over ``requests`` (node id -> ``FitIns``) through ``grid``: the nodes train and send their
    masked replies, and only their example-weighted average is unmasked (``max_weight``: the largest example
    count a node may weigh, W above; ``timeout``: seconds each of the four stages waits for replies)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import Strategy as LegacyStrategy
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow

    counts = ProtocolBytes()
    wired = counting_grid(grid, counts)
    outcome = SecureRound({}, None, counts)

    class RoundRequests(LegacyStrategy):
        """The legacy strategy SecAgg+'s workflow asks: this round's requests, and a receiver for the
        average (fedlora's method aggregates it; the global arrays are never Flower's)."""

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
            return [(GridClientProxy(node, wired, 0), fit_ins) for node, fit_ins in requests.items()]

        def aggregate_fit(
            self, server_round: int, results: Any, failures: Any
        ) -> tuple[None, dict[str, Any]]:
            from flwr.common import parameters_to_ndarrays

            outcome.results = {proxy.node_id: res for proxy, res in results}
            if results:
                outcome.average = parameters_to_ndarrays(results[0][1].parameters)
            return None, {}

        def initialize_parameters(self, client_manager: Any) -> None:
            return None

        def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
            return []

        def aggregate_evaluate(
            self, server_round: int, results: Any, failures: Any
        ) -> tuple[None, dict[str, Any]]:
            return None, {}

        def evaluate(self, server_round: int, parameters: Any) -> None:
            return None

    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    context = LegacyContext(Context(0, 0, {}, state, {}), strategy=RoundRequests())
    workflow = SecAggPlusWorkflow(
        num_shares=fed.secagg_num_shares,
        reconstruction_threshold=fed.secagg_reconstruction_threshold,
        max_weight=max_weight,
        clipping_range=fed.secagg_clipping_range,
        quantization_range=fed.secagg_quantization_range,
        timeout=timeout,
    )
    workflow(wired, context)
    return outcome


def quantisation_bound(fed: FederationConfig, weights: list[int], max_weight: float) -> float:
    """The largest error of an entry of SecAgg+'s average of replies within [-c, c]: m steps 2c / T of the
    weighted entries, over the sum of the quantised weights q_i / T (module docstring)."""
    levels = fed.secagg_quantization_range
    quantised = sum(round(n / max_weight * levels) for n in weights) / levels
    return len(weights) * (2 * fed.secagg_clipping_range / levels) / quantised


def secure_replies(
    outcome: SecureRound, node_client: dict[int, int], expected: dict[int, AdapterState]
) -> dict[int, ClientReply | str]:
    """Each replying client's :class:`ClientReply` with the average as its payload (tensors named by the
    reply's own key list, in the dtypes the server expects: ``expected[client]``)."""
    replies: dict[int, ClientReply | str] = {}
    if outcome.average is None:
        return replies
    average: AdapterState | None = None
    for node, result in outcome.results.items():
        client = node_client.get(node)
        if client is None:
            continue
        keys = json.loads(str(result.metrics[KEYS_METRIC]))
        if average is None:
            average = from_ndarrays(keys, outcome.average, expected.get(client))
        if keys != sorted(average):
            replies[client] = "secure aggregation: its tensors differ from the other replies' (not summable)"
            continue
        metrics = dict(json.loads(str(result.metrics[METRICS_METRIC])))
        metrics["secagg_bytes_down"] = outcome.counts.down.get(node, 0)
        sent = outcome.counts.up.get(node, 0)
        examples = int(result.metrics[EXAMPLES_METRIC])
        replies[client] = ClientReply(client, average, examples, metrics, bytes_sent=sent)
    return replies
