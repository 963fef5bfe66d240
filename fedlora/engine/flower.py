"""Flower engine: the same strategies, rounds, checks and checkpoints, with clients behind Flower messages.

Server side (:class:`FlowerEngine`) is the embedded engine with another transport: each round's
instructions become one Flower ``Message`` per client (its own payload as an ``ArrayRecord``, its settings as
a ``ConfigRecord``), sent through the ``Grid``; the replies come back the same way (adapter as an
``ArrayRecord``, metrics as a ``MetricRecord``). Nothing is pickled: ArrayRecords carry raw tensor bytes.
Before round 1 the server sends a ``query`` message to every node and learns which data partition it holds
and, in deployment, its rank budget (``flower-supernode --node-config "partition-id=3 rank-budget=8"``).

Client side (:func:`client_app`): a Flower ``ClientApp`` that builds the experiment from the same config
(data, model, adapters; once per process) and answers ``query`` and ``train`` with fedlora's own
``run_client``. The strategies know nothing of Flower; Flower knows nothing of the strategies.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedlora.adapters.ranks import RankProfile
from fedlora.config.loader import ConfigError
from fedlora.config.schema import ExperimentConfig
from fedlora.engine.embedded import EmbeddedEngine, Simulation
from fedlora.strategies.base import ClientInstruction, ClientReply

log = logging.getLogger(__name__)

# What fedlora sets in every Flower process it starts: no runtime dependency installation, no update
# check, no telemetry.
FLOWER_ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0"}


def quiet_flower() -> None:
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)


def _settings_record(settings: dict[str, Any]) -> Any:
    from flwr.app import ConfigRecord

    return ConfigRecord({k: v for k, v in settings.items() if v is not None})


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


class FlowerEngine(EmbeddedEngine):
    """Rounds driven by the embedded engine's logic; clients reached through a Flower ``Grid``."""

    def __init__(
        self,
        sim: Simulation,
        run_dir: Path,
        grid: Any,
        status: Callable[[str], None] | None = None,
        wait_for_nodes_s: float = 120.0,
    ) -> None:
        if sim.client_models is not None:
            raise ConfigError(
                "engine flower: model-heterogeneous clients (model.variants) run on the embedded engine only"
            )
        super().__init__(sim, run_dir, status)
        self.grid = grid
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
            node_of[client] = reply.metadata.src_node_id
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
                    "settings": _settings_record(instruction.settings),
                    "meta": ConfigRecord({"round": server_round, "client": client_id}),
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


def _config_from_text(text: str) -> ExperimentConfig:
    import yaml

    from fedlora.config.loader import config_from_dict

    return config_from_dict(yaml.safe_load(text))


def client_app(config: ExperimentConfig | None = None) -> Any:
    """A Flower ClientApp running fedlora clients (config given, or from the run config's ``fedlora-config``)."""
    quiet_flower()
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()
    built: dict[str, EmbeddedEngine] = {}

    def engine_for(context: Any) -> tuple[EmbeddedEngine, ExperimentConfig]:
        cfg = config or _config_from_text(str(context.run_config["fedlora-config"]))
        key = cfg.model_dump_json()
        if key not in built:
            from fedlora.runner import build_simulation

            torch.set_num_threads(cfg.client.num_threads)
            sim, _ = build_simulation(cfg, for_training=False)
            built[key] = EmbeddedEngine(sim, Path(os.environ.get("FEDLORA_CLIENT_DIR", ".fedlora-client")))
        return built[key], cfg

    def partition(context: Any) -> int:
        return int(context.node_config["partition-id"])

    @app.query()
    def query(msg: Any, context: Any) -> Any:
        engine, _ = engine_for(context)
        client = partition(context)
        info: dict[str, Any] = {"partition-id": client}
        budget = context.node_config.get("rank-budget")
        if budget is not None:
            info["rank-attention"] = int(budget)
            info["rank-mlp"] = int(context.node_config.get("rank-budget-mlp", budget))
        info["num-examples"] = engine.sim.federation.clients[client].size("train")
        return Message(content=RecordDict({"profile": ConfigRecord(info)}), reply_to=msg)

    @app.train()
    def train(msg: Any, context: Any) -> Any:
        engine, _ = engine_for(context)
        client = partition(context)
        settings = dict(msg.content["settings"])
        server_round = int(msg.content["meta"]["round"])
        reply = engine.run_client(
            server_round, client, ClientInstruction(from_arrays(msg.content["payload"]), settings)
        )
        content = RecordDict(
            {
                "payload": to_arrays(reply.payload),
                "metrics": _metrics_record(reply.metrics),
                "meta": ConfigRecord({"num-examples": reply.num_examples}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def server_app(
    config: ExperimentConfig | None = None, run_dir: Path | None = None, resume: bool = False
) -> Any:
    """A Flower ServerApp running a fedlora experiment (config given, or from the run config)."""
    quiet_flower()
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        from fedlora.runner import run_experiment

        cfg = config or _config_from_text(str(context.run_config["fedlora-config"]))
        folder = run_dir or Path(str(context.run_config["run-dir"]))
        run_experiment(
            cfg,
            folder,
            resume=resume,
            show_progress=False,
            engine_factory=lambda sim, path, status: FlowerEngine(sim, path, grid, status),
        )

    return app


def run_flower_simulation(cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> Path:
    """``engine: flower-sim``: the experiment on Flower's simulation runtime, one SuperNode per client."""
    quiet_flower()
    from flwr.simulation import run_simulation

    from fedlora.data.federation import build_federation

    num_nodes = len(build_federation(cfg).clients)
    run_simulation(
        server_app=server_app(cfg, run_dir, resume),
        client_app=client_app(cfg),
        num_supernodes=num_nodes,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if not (run_dir / "global").exists():
        raise RuntimeError(f"the Flower simulation ended without finishing the run in {run_dir}")
    return run_dir
