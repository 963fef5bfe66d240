"""Flower's ServerApp and ClientApp running fedlora: the server runs fedlora's rounds with a
:class:`~fedlora.engine.flower.transport.FlowerTransport`; each client process keeps one ClientNode."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedlora.client.node import ClientNode
from fedlora.config.schema import ExperimentConfig
from fedlora.engine.flower.environment import quiet_flower
from fedlora.engine.flower.secure import (
    fit_reply_records,
    is_fit_request,
    read_fit_request,
    secure_aggregation_mod,
)
from fedlora.engine.flower.transport import FlowerTransport, read_request_records, reply_records
from fedlora.engine.node_spec import NodeSpec
from fedlora.engine.transport import Simulation
from fedlora.errors import ConfigError
from fedlora.preflight import check_experiment, prepare_node

#: run-config key of the partition -> SuperNode public key binding (JSON; written with --tls)
NODE_KEYS = "fedlora-node-keys"
#: run-config keys of a fedlora Flower app that are not config fields
APP_KEYS = ("fedlora-config", "run-dir", NODE_KEYS)


def scalar_fields(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config's scalar leaves as dotted keys (``federation.rounds``): what a Flower app exposes as
    run-config keys, one by one (lists and nulls stay in the whole-config text)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalar_fields(value, f"{path}."))
        elif isinstance(value, (bool, int, float, str)):
            out[path] = value
    return out


def config_from_run_config(run_config: Any) -> ExperimentConfig:
    """The app's config (``fedlora-config``) with the run-config's single keys applied over it, so that
    ``flwr run . --run-config "federation.rounds=3"`` changes that one field."""
    import yaml

    from fedlora.config.loader import schema_config, set_path

    tree = yaml.safe_load(str(run_config["fedlora-config"]))
    known = scalar_fields(tree)
    for key, value in dict(run_config).items():
        if key in APP_KEYS:
            continue
        if key not in known:
            raise ConfigError(f"flower run-config: {key!r} is not a field of the fedlora config")
        if value != known[key]:
            set_path(tree, key.split("."), value)
    return check_experiment(schema_config(tree))


# One ClientNode per process and config, kept across messages and across ClientApp objects (the simulation
# runtime may build the app more than once in a worker process).
_NODES: dict[str, ClientNode] = {}


def process_node(
    spec: NodeSpec, build_node: Callable[[NodeSpec], ClientNode], client_dir: Path | None = None
) -> ClientNode:
    """This process's node for ``spec``, built the first time the spec is seen here (``client_dir``: where
    it keeps its clients' personal state; default ``$FEDLORA_CLIENT_DIR`` or ``.fedlora-client``).

    A module-level function on purpose: Flower's Ray backend sends the ClientApp to its actors with
    cloudpickle for every message, which copies the globals of the app's nested functions by value; the
    cache must be looked up here, in this module's own globals, or every message would build a new node
    (data and model)."""
    folder = client_dir or Path(os.environ.get("FEDLORA_CLIENT_DIR", ".fedlora-client"))
    key = f"{folder}|{spec.model_dump_json()}"
    if key not in _NODES:
        prepare_node(spec.plugins)  # this process's entry (a Flower node): plugins and methods
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)  # the server showed them once
        torch.set_num_threads(spec.client.num_threads)
        node = build_node(spec)
        node.use_store(folder / "personal")
        _NODES[key] = node
    return _NODES[key]


def client_app(
    build_node: Callable[[NodeSpec], ClientNode],
    config: ExperimentConfig | None = None,
    client_dir: Path | None = None,
) -> Any:
    """A Flower ClientApp running fedlora clients (config given, or from the run config's
    ``fedlora-config``); ``build_node`` makes the node from the config's :class:`NodeSpec` the first time
    a spec is seen in this process (``client_dir``: :func:`process_node`)."""
    quiet_flower()
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def node_for(context: Any) -> ClientNode:
        spec = NodeSpec.of(config or config_from_run_config(context.run_config))
        return process_node(spec, build_node, client_dir)

    def partition(context: Any) -> int:
        value = context.node_config.get("partition-id")
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(
                f"flower: this SuperNode's --node-config gives partition-id {value!r}; give an integer "
                '(--node-config "partition-id=0 num-partitions=N")'
            )
        return value

    @app.query()
    def query(msg: Any, context: Any) -> Any:
        node = node_for(context)
        client = partition(context)
        if not 0 <= client < len(node.clients):
            raise ConfigError(
                f"flower: partition-id {client} does not exist: the federation has {len(node.clients)} clients "
                f"(0..{len(node.clients) - 1})"
            )
        info: dict[str, Any] = {"partition-id": client}
        key = context.node_config.get("auth-key")  # the node's SuperNode key: proves the partition is its own
        if key is not None:
            from fedlora.engine.flower.tls import sign_claim

            info["signature"] = sign_claim(Path(str(key)), str(msg.content["config"]["nonce"]), client)
        budget = context.node_config.get("rank-budget")
        if budget is not None:
            info["rank-attention"] = int(budget)
            info["rank-mlp"] = int(context.node_config.get("rank-budget-mlp", budget))
        info["num-examples"] = node.clients[client].size("train")
        return Message(content=RecordDict({"profile": ConfigRecord(info)}), reply_to=msg)

    @app.train(mods=[secure_aggregation_mod])
    def train(msg: Any, context: Any) -> Any:
        node = node_for(context)
        secure = is_fit_request(msg.content)  # a secure round's request (SecAgg+ masks the reply)
        read = read_fit_request if secure else read_request_records
        server_round, named, instruction, assigned = read(msg.content)
        if assigned:  # a simulation slot: every client's data is in this process
            client = named
        else:
            client = partition(context)
            if named != client:
                raise ConfigError(
                    f"flower: a message for client {named} reached the node holding partition {client}"
                )
        reply = node.train(server_round, client, instruction)
        if secure:
            return Message(content=fit_reply_records(server_round, reply, instruction), reply_to=msg)
        return Message(content=reply_records(reply), reply_to=msg)

    return app


#: what the server app runs: (config, run folder, resume, transport factory) -> None (the runner's rounds)
RunFunction = Callable[
    [ExperimentConfig, Path, bool, Callable[[Simulation, Callable[[str], None]], Any]], None
]


def server_app(
    run: RunFunction,
    config: ExperimentConfig | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
    routing: str = "query",
) -> Any:
    """A Flower ServerApp that runs ``run`` (fedlora's rounds) with the clients behind the Grid, found by
    ``routing`` (:data:`~fedlora.engine.flower.transport.ROUTINGS`)."""
    quiet_flower()
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        cfg = config or config_from_run_config(context.run_config)
        folder = run_dir or Path(str(context.run_config["run-dir"]))
        keys = {int(k): v for k, v in json.loads(str(context.run_config.get(NODE_KEYS, "{}"))).items()}

        run(
            cfg,
            folder,
            resume,
            lambda sim, status: FlowerTransport(sim, grid, status, routing=routing, node_keys=keys),
        )

    return app
