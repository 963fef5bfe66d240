"""Flower engine: the same strategies, rounds, checks and checkpoints, with clients behind Flower messages.

Server side: the embedded engine's round logic with another transport (:class:`FlowerTransport`): each
round's instructions become one Flower ``Message`` per client (its own payload as an ``ArrayRecord``, its
plan, i.e. generic settings and the method's hook objects, as JSON in a ``ConfigRecord``), sent through the
``Grid``; the replies come back the same way (adapter as an
``ArrayRecord``, metrics as a ``MetricRecord``). Nothing is pickled: ArrayRecords carry raw tensor bytes.
Before round 1 the server sends a ``query`` message to every node and learns which data partition it holds
and, in deployment, its rank budget (``flower-supernode --node-config "partition-id=3 rank-budget=8"``).

Client side (:func:`client_app`): a Flower ``ClientApp`` holding a :class:`~fedlora.client.node.ClientNode`
(data, model, adapters: built once per process and config, kept across messages; no server part) that
answers ``query`` and ``train``. The strategies know nothing of Flower; Flower knows nothing of the
strategies; this module knows nothing of the runner (the runner passes in what to run).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedlora.adapters.ranks import RankProfile
from fedlora.client.node import ClientNode
from fedlora.config.loader import ConfigError
from fedlora.config.schema import ExperimentConfig
from fedlora.engine.embedded import Simulation
from fedlora.protocol import ClientInstruction, ClientReply, plan_from_json, plan_to_json

log = logging.getLogger(__name__)

# What fedlora sets in every Flower process it starts: no runtime dependency installation, no update
# check, no telemetry, and Ray's notice about GPU visibility (num_gpus=0 actors) off.
FLOWER_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def flower_log_level() -> str:
    """Flower's and Ray's log level: ``FEDLORA_FLOWER_LOG`` (default WARNING)."""
    return os.environ.get("FEDLORA_FLOWER_LOG", "WARNING").upper()


def quiet_flower() -> None:
    """Flower's environment settings, and its own logger at WARNING (its per-message INFO/DEBUG lines
    flood a simulation's console; ``FEDLORA_FLOWER_LOG=INFO`` or ``DEBUG`` brings them back)."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(flower_log_level())
    flwr_log.propagate = False  # it has its own console handler: not twice through the root logger


def _metrics_record(metrics: dict[str, Any]) -> Any:
    from flwr.app import MetricRecord

    return MetricRecord(
        {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    )


def to_arrays(state: dict[str, torch.Tensor]) -> Any:
    from flwr.app import ArrayRecord

    return ArrayRecord(torch_state_dict={k: v.detach().contiguous().cpu() for k, v in state.items()})


def from_arrays(record: Any) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


class FlowerTransport:
    """Reaches the sampled clients through a Flower ``Grid``: one message per client and round."""

    def __init__(
        self,
        sim: Simulation,
        grid: Any,
        status: Callable[[str], None] | None = None,
        wait_for_nodes_s: float = 120.0,
    ) -> None:
        if sim.client_models is not None:
            raise ConfigError(
                "engine flower: model-heterogeneous clients (model.variants) run on the embedded engine only"
            )
        self.sim = sim
        self.grid = grid
        if isinstance(getattr(grid, "pull_interval", None), float):  # the simulation's in-memory grid polls
            grid.pull_interval = min(grid.pull_interval, 0.01)  # for replies every 0.1 s by default
        self.status = status or (lambda text: None)
        self.node_of = self.discover_clients(wait_for_nodes_s)

    def discover_clients(self, timeout_s: float) -> dict[int, int]:
        """QUERY every node: which partition (client id) it holds and, if given, its rank budget."""
        from flwr.app import ConfigRecord, Message, RecordDict

        expected = len(self.sim.federation.clients)
        deadline = time.monotonic() + timeout_s
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < expected and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        if len(nodes) < expected:
            raise ConfigError(f"flower: {len(nodes)} nodes connected, the federation has {expected} clients")
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
            if "num-examples" in info:  # fixed at registration: later replies cannot claim more
                self.sim.strategy.client_sizes[client] = int(info["num-examples"])
            if "rank-attention" in info:  # the node's own rank budget (deployment --node-config)
                profile = RankProfile(int(info["rank-attention"]), int(info["rank-mlp"]))
                if profile.attention > largest.attention or profile.mlp > largest.mlp:
                    raise ConfigError(
                        f"flower: client {client} reports rank {profile.name}, above the largest rank the "
                        f"server was configured for ({largest.name}); raise resources.rank_types"
                    )
                self.sim.strategy.client_profiles[client] = profile
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
        for client_id, instruction in instructions.items():
            node = self.node_of[client_id]
            sent[node] = client_id
            content = RecordDict(
                {
                    "payload": to_arrays(instruction.payload),
                    "meta": ConfigRecord(
                        {"round": server_round, "client": client_id, "plan": plan_to_json(instruction)}
                    ),
                }
            )
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
            metrics = dict(content["metrics"])
            replies[client_id] = ClientReply(
                client_id, from_arrays(content["payload"]), int(content["meta"]["num-examples"]), metrics
            )
        return replies


#: run-config keys of a fedlora Flower app that are not config fields
APP_KEYS = ("fedlora-config", "run-dir")


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

    from fedlora.config.loader import config_from_dict, set_path

    tree = yaml.safe_load(str(run_config["fedlora-config"]))
    known = scalar_fields(tree)
    for key, value in dict(run_config).items():
        if key in APP_KEYS:
            continue
        if key not in known:
            raise ConfigError(f"flower run-config: {key!r} is not a field of the fedlora config")
        if value != known[key]:
            set_path(tree, key.split("."), value)
    return config_from_dict(tree)


# One ClientNode per process and config, kept across messages and across ClientApp objects (the simulation
# runtime may build the app more than once in a worker process).
_NODES: dict[str, ClientNode] = {}


def client_app(
    build_node: Callable[[ExperimentConfig], ClientNode], config: ExperimentConfig | None = None
) -> Any:
    """A Flower ClientApp running fedlora clients (config given, or from the run config's
    ``fedlora-config``); ``build_node`` makes the node the first time a config is seen in this process."""
    quiet_flower()
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def node_for(context: Any) -> ClientNode:
        cfg = config or config_from_run_config(context.run_config)
        key = cfg.model_dump_json()
        if key not in _NODES:
            import warnings

            warnings.filterwarnings("ignore", category=FutureWarning)  # the server showed them once
            torch.set_num_threads(cfg.client.num_threads)
            node = build_node(cfg)
            node.use_store(Path(os.environ.get("FEDLORA_CLIENT_DIR", ".fedlora-client")) / "personal")
            _NODES[key] = node
        return _NODES[key]

    def partition(context: Any) -> int:
        return int(context.node_config["partition-id"])

    @app.query()
    def query(msg: Any, context: Any) -> Any:
        node = node_for(context)
        client = partition(context)
        info: dict[str, Any] = {"partition-id": client}
        budget = context.node_config.get("rank-budget")
        if budget is not None:
            info["rank-attention"] = int(budget)
            info["rank-mlp"] = int(context.node_config.get("rank-budget-mlp", budget))
        info["num-examples"] = node.clients[client].size("train")
        return Message(content=RecordDict({"profile": ConfigRecord(info)}), reply_to=msg)

    @app.train()
    def train(msg: Any, context: Any) -> Any:
        node = node_for(context)
        client = partition(context)
        meta = msg.content["meta"]
        instruction = plan_from_json(str(meta["plan"]), from_arrays(msg.content["payload"]))
        reply = node.train(int(meta["round"]), client, instruction)
        content = RecordDict(
            {
                "payload": to_arrays(reply.payload),
                "metrics": _metrics_record(reply.metrics),
                "meta": ConfigRecord({"num-examples": reply.num_examples}),
            }
        )
        return Message(content=content, reply_to=msg)

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
) -> Any:
    """A Flower ServerApp that runs ``run`` (fedlora's rounds) with the clients behind the Grid."""
    quiet_flower()
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        cfg = config or config_from_run_config(context.run_config)
        folder = run_dir or Path(str(context.run_config["run-dir"]))
        run(cfg, folder, resume, lambda sim, status: FlowerTransport(sim, grid, status))

    return app


def check_ray_disk(folder: str | None = None) -> None:
    """Refuse to start Ray where it would hang: Ray creates no objects once the disk holding its session folder
    (``RAY_TMPDIR`` or the system temp folder) is fuller than ``local_fs_capacity_threshold`` (0.95 unless
    ``RAY_local_fs_capacity_threshold`` says otherwise; used = 1 - available / capacity, as Ray measures it),
    and a Flower simulation then waits forever without an error. Raises OSError(ENOSPC) naming the folder."""
    folder = folder or os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    usage = shutil.disk_usage(folder)
    threshold = float(os.environ.get("RAY_local_fs_capacity_threshold", "0.95"))  # noqa: SIM112 (Ray's name)
    used = 1.0 - usage.free / usage.total
    if used > threshold:
        need = (used - threshold) * usage.total / 2**30
        raise OSError(
            errno.ENOSPC,
            f"engine flower-sim: the disk is {used:.1%} full, above Ray's limit of {threshold:.0%}, where Ray "
            f"creates no objects and the simulation would hang; free at least {need:.1f} GiB (or set "
            "RAY_TMPDIR to a folder on another disk, or use engine=embedded)",
            folder,
        )


def run_flower_simulation(cfg: ExperimentConfig, run_dir: Path, server: Any, client: Any) -> Path:
    """``engine: flower-sim``: the given apps on Flower's simulation runtime, one SuperNode per client."""
    quiet_flower()
    check_ray_disk()
    from flwr.simulation import run_simulation

    from fedlora.compute import resolve_device
    from fedlora.data.federation import build_federation
    from fedlora.engine.embedded import clients_per_round

    num_nodes = len(build_federation(cfg).clients)
    # on a GPU the round's clients share it: each ClientApp asks for 1 / (clients per round) of it
    gpu = resolve_device(cfg.compute.device).type == "cuda"
    share = 1.0 / clients_per_round(cfg, num_nodes) if gpu else 0.0
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=num_nodes,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": share},
            "init_args": {"logging_level": flower_log_level()},
        },
    )
    if not (run_dir / "global").exists():
        raise RuntimeError(f"the Flower simulation ended without finishing the run in {run_dir}")
    return run_dir
