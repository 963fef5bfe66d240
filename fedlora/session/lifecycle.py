"""The run lifecycle: start or resume a run into its folder, stop cleanly on signals, and the Flower apps
that run the same rounds behind Flower messages."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file

from fedlora.compute import quiet_libraries, resolve_precision
from fedlora.config.loader import config_text
from fedlora.config.schema import ExperimentConfig
from fedlora.data.examples import Federation
from fedlora.data.federation import SourceRequest, build_federation, rows_source
from fedlora.engine import setup
from fedlora.engine.deadline import ClientDeadline
from fedlora.engine.embedded import EmbeddedEngine
from fedlora.engine.node_spec import NodeSpec
from fedlora.engine.run_folder import (
    atomic_write_text,
    run_lock,
    sha256_bytes,
    write_effective_config,
)
from fedlora.engine.sampling import clients_per_round
from fedlora.engine.setup import build_client_node
from fedlora.engine.transport import RunInterrupted, Simulation, StopFlag, Transport
from fedlora.engine.workers import PaddedTokenCost, WorkerPoolTransport, parallel_workers, worker_devices
from fedlora.errors import ConfigError
from fedlora.models.loading import ModelBundle
from fedlora.preflight import check_experiment
from fedlora.session.export import finalize
from fedlora.session.recording import RoundRecorder, run_headline
from fedlora.session.resume import load_run_config, resume_point
from fedlora.session.run_info import write_run_info
from fedlora.tracking.metrics import MetricsLog
from fedlora.tracking.report import RoundProgress
from fedlora.tracking.trackers import open_trackers

log = logging.getLogger(__name__)


def default_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output.root) / f"{stamp}-{cfg.name}"


@dataclass
class RunResult:
    """What a run produced, without reading its files: the run directory, one record per round (as in
    ``metrics.jsonl``), the final global state (the adapter, or the whole model for full-parameter methods)
    and the last round's figures."""

    run_dir: Path
    records: list[dict[str, Any]]
    final_state: dict[str, torch.Tensor]

    @property
    def metrics(self) -> dict[str, Any]:
        """The last round's record without its per-client details."""
        last = self.records[-1] if self.records else {}
        return {k: v for k, v in last.items() if k not in ("clients", "rejected", "faults")}


TransportFactory = Callable[[Simulation, Callable[[str], None]], Transport]


def build_simulation(
    cfg: ExperimentConfig, for_training: bool = True, federation: Federation | None = None
) -> tuple[Simulation, ModelBundle]:
    """Preflight ``cfg``, then build its simulation (:func:`fedlora.engine.setup.assemble_simulation`)."""
    check_experiment(cfg)
    return setup.assemble_simulation(cfg, for_training, federation)


def run_experiment(cfg: ExperimentConfig, run_dir: Path | None = None, **options: Any) -> Path:
    """:func:`run`, returning only the run directory (``options``: those of :func:`run`)."""
    return run(cfg, run_dir, **options).run_dir


def run(
    cfg: ExperimentConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
    transport_factory: TransportFactory | None = None,
    federation: Federation | None = None,
    dataset: Iterable[dict[str, Any]] | None = None,
) -> RunResult:
    """Run (or resume) an experiment into ``run_dir``.

    ``federation``: the clients' data given directly (a :class:`~fedlora.data.examples.Federation`) instead of
    the config's ``data`` section; ``dataset``: rows (a ``datasets.Dataset``, a list of dicts) read with the
    config's field names and partitioned by its ``partition`` section. ``engine: flower-sim`` hands the run to Flower's simulation runtime, whose
    ServerApp runs these same rounds with the clients behind Flower messages (``transport_factory``).
    """
    request = RunRequest(run_dir, resume, console, show_progress, transport_factory)
    with quiet_libraries():
        check_experiment(cfg)  # a config built in Python gets the same refusals as one read from YAML
        cfg = with_resolved_precision(cfg, request)
        if dataset is not None:
            if federation is not None:
                raise ConfigError("give federation or dataset, not both")
            federation = build_federation(cfg, rows_source(SourceRequest.of(cfg), dataset))
        if cfg.engine == "flower-sim" and transport_factory is None:
            return run_on_flower_simulation(cfg, request, federation)
        if cfg.federation.secure_aggregation and transport_factory is None:
            raise ConfigError(
                "config field 'federation.secure_aggregation': SecAgg+ runs between Flower's server and its "
                "client nodes (engine: flower-sim, or fedlora deploy); on the embedded engine every client's "
                "update is in this one process: set engine: flower-sim"
            )
        return run_rounds(cfg, request, federation)


def with_resolved_precision(cfg: ExperimentConfig, request: RunRequest) -> ExperimentConfig:
    """``cfg`` with ``compute.precision: auto`` replaced by what it is on this run's device
    (:func:`fedlora.compute.resolve_precision`), so that config.yaml records the precision the run trained
    at; a resume takes the precision its run started with (on another machine too: the rounds go on as they
    began). ``cfg`` itself is not changed."""
    if cfg.compute.precision != "auto":
        return cfg
    folder = request.folder(cfg)
    precision: str
    if request.resume and (folder / "config.yaml").exists():
        precision = load_run_config(folder).compute.precision
    else:
        precision = resolve_precision(cfg.compute.precision, cfg.compute.device)
    return cfg.model_copy(update={"compute": cfg.compute.model_copy(update={"precision": precision})})


@dataclass
class RunRequest:
    """How :func:`run` was asked to run: into which folder, started or resumed, shown how, and how the
    clients are reached (a transport factory: Flower's ServerApp gives one)."""

    run_dir: Path | None = None
    resume: bool = False
    console: Console | None = None
    show_progress: bool = True
    transport_factory: TransportFactory | None = None

    def folder(self, cfg: ExperimentConfig) -> Path:
        """The run folder: the one asked for, else ``output.dir``, else a new timestamped one."""
        return Path(self.run_dir or cfg.output.dir or default_run_dir(cfg))

    def output(self) -> Console:
        """The console the run prints to (stderr; 140 columns when it is not a terminal)."""
        if self.console is not None:
            return self.console
        console = Console(stderr=True)
        return console if console.is_terminal else Console(stderr=True, width=140)


def refuse_existing_run(run_dir: Path, resume: bool) -> None:
    """ConfigError when a new run would overwrite one (``metrics.jsonl`` exists), or a resume has no run."""
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir} already holds a run; use --resume {run_dir} or another --output")
    if resume and not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml): nothing to resume")


def run_on_flower_simulation(
    cfg: ExperimentConfig, request: RunRequest, federation: Federation | None
) -> RunResult:
    """``engine: flower-sim``: Flower's simulation runtime runs these same rounds, the clients behind Flower
    messages (in a private network namespace where the machine allows one)."""
    if federation is not None:
        raise ConfigError(
            "engine flower-sim: each Flower client process builds the data from the config's data section, "
            "so a dataset or federation given in Python cannot reach it; save the rows to a file "
            "(data.source=json or hf) or use engine=embedded"
        )
    target = request.folder(cfg)
    if not request.resume:
        refuse_existing_run(target, resume=False)
    from fedlora.engine.flower import isolation, run_flower_simulation

    if cfg.compute.flower_network == "private" and not isolation.inside_private_network():
        if isolation.private_network_available():  # Ray's ports unreachable from outside (isolation.py)
            stored = load_run_config(target) if request.resume else None
            isolation.run_simulation_privately(cfg, target, request.resume, request.show_progress, stored)
            return flower_result(target)
        log.warning(
            "engine flower-sim: this machine allows no private network namespace, so Ray's ports listen on "
            "every interface; run it where they are firewalled (compute.flower_network: host hides this)"
        )
    federation = build_federation(cfg)  # the server's, built once (each client process builds its own)
    server = flower_server_app(cfg, target, request.resume, routing="assigned", federation=federation)
    # the clients' personal state in the run folder (as the embedded engine's), not shared between runs
    client = flower_client_app(cfg, target.resolve() / "nodes")
    run_flower_simulation(cfg, target, len(federation.clients), server, client)
    return flower_result(target)


def run_rounds(cfg: ExperimentConfig, request: RunRequest, federation: Federation | None) -> RunResult:
    """The rounds in this process (the clients in it, in worker processes, or behind the request's
    transport), from the start or from the run folder's last checkpoint; then the export and the summary."""
    console, run_dir, resume = request.output(), request.folder(cfg), request.resume
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    refuse_existing_run(run_dir, resume)
    with contextlib.ExitStack() as stack:
        if resume:  # check everything about the folder before loading any model
            stack.enter_context(run_lock(run_dir))
            checkpoint, changes = resume_point(run_dir, cfg, metrics)
        # data and model errors surface before the run directory is made
        sim, bundle = setup.assemble_simulation(cfg, federation=federation)
        if not resume:
            stack.enter_context(run_lock(run_dir))
            refuse_existing_run(run_dir, resume=False)  # again, holding the lock
            checkpoint, changes = None, {}
            atomic_write_text(run_dir / "config.yaml", config_text(cfg))
        start_round = checkpoint.round + 1 if checkpoint else 1
        records = metrics.truncate_after(start_round - 1) if resume else []
        if checkpoint:
            sim.server.restore(checkpoint.tensors, checkpoint.meta)
            console.print(f"resuming {run_dir} after round {checkpoint.round}")
        effective = config_text(cfg) if changes else None
        write_run_info(run_dir, sim, bundle, changes, start_round, effective)
        if effective is not None:
            write_effective_config(run_dir, effective)

        trackers = open_trackers(cfg, run_dir)
        for tracker in trackers:
            stack.callback(tracker.close)
        progress = RoundProgress(
            cfg.federation.rounds, start_round - 1, console, enabled=request.show_progress
        )
        stop = StopFlag()
        transport: Transport | None
        if request.transport_factory is not None:
            transport = request.transport_factory(sim, progress.status)
        else:
            transport = local_transport(cfg, sim, run_dir, progress.status, stop, console)
            if isinstance(transport, WorkerPoolTransport):
                stack.callback(transport.close)
                transport.start()  # each worker loads its model now, not inside round 1's time
        engine = EmbeddedEngine(sim, run_dir, status=progress.status, transport=transport, stop=stop)
        engine.meta_extra["config_sha256"] = sha256_bytes((run_dir / "config.yaml").read_bytes())
        console.print(run_headline(cfg, sim, engine.per_round))
        recorder = RoundRecorder(cfg, sim, bundle, run_dir, metrics, trackers, records, progress)
        with progress, stop_on_signals(stop, console):
            try:
                if recorder.early is not None and recorder.early.should_stop:  # resumed after it had stopped
                    console.print(f"early stopping: no improvement since round {recorder.early.best_round}")
                else:
                    engine.run(start_round, recorder.on_round)
            except RunInterrupted as stopped:
                console.print(
                    f"stopped by signal {stopped.signum}: rounds 1..{stopped.last_round} are complete and "
                    f"checkpointed. Resume with: fedlora run --resume {run_dir}"
                )
                raise
        final_state = finalize(run_dir, cfg, sim, bundle, records, console)
        files = [p for p in (run_dir / "curves.png", metrics.path) if p.exists()]
        for tracker in trackers:
            tracker.finish(records, files)
    return RunResult(run_dir, records, final_state)


def flower_result(target: Path) -> RunResult:
    """A finished flower-sim run's result, read from its folder."""
    records = MetricsLog(target / "metrics.jsonl").read()
    adapter = target / "global" / "adapter_model.safetensors"
    state = load_file(str(adapter if adapter.exists() else target / "global" / "model.safetensors"))
    return RunResult(target, records, state)


def local_transport(
    cfg: ExperimentConfig,
    sim: Simulation,
    run_dir: Path,
    status: Callable[[str], None],
    stop: StopFlag,
    console: Console,
) -> Transport | None:
    """How this process reaches its clients (``compute``): worker processes, or None (in this process)."""
    assert sim.adapters.model is not None
    size = sum(p.numel() for p in sim.adapters.model.parameters())
    per_round = clients_per_round(cfg.federation, len(sim.federation.clients))
    workers = parallel_workers(cfg.compute, size, per_round)
    if cfg.compute.batch_clients and workers > 1:
        console.print(
            "compute.batch_clients: the round's clients train together in this process (no workers)"
        )
        return None
    if workers <= 1:
        return None
    devices = worker_devices(cfg.compute, workers)
    console.print(
        f"{len(devices)} worker processes ({', '.join(devices)}), {cfg.client.num_threads} thread(s) each"
    )
    cost = PaddedTokenCost(cfg.client, sim.federation, sim.encoder)
    deadline = ClientDeadline.of(cfg.federation)
    return WorkerPoolTransport(NodeSpec.of(cfg), deadline, devices, run_dir / "personal", status, stop, cost)


@contextlib.contextmanager
def stop_on_signals(stop: StopFlag, console: Console) -> Iterator[None]:
    """The first SIGINT / SIGTERM asks the engine to stop cleanly (the current round is abandoned, the last
    checkpoint stands); a second one ends the process at once. Only in the main thread (Flower's simulation
    runs the server in another)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop:
            os._exit(128 + signum)
        stop.signum = signum
        console.print(f"signal {signum}: stopping after the current client (again to stop at once)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def flower_server_app(
    config: ExperimentConfig | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
    routing: str = "query",
    federation: Federation | None = None,
):
    """A Flower ServerApp running fedlora's rounds (config given, or from the Flower run config); ``routing``:
    how it finds each client's node (:data:`fedlora.engine.flower.transport.ROUTINGS`); ``federation``: the
    config's clients when already built."""
    from fedlora.engine.flower import server_app

    def start(cfg: ExperimentConfig, folder: Path, resume: bool, factory: TransportFactory) -> None:
        run_experiment(
            cfg, folder, resume=resume, show_progress=False, transport_factory=factory, federation=federation
        )

    return server_app(start, config, run_dir, resume, routing)


def flower_client_app(config: ExperimentConfig | None = None, client_dir: Path | None = None):
    """A Flower ClientApp whose nodes keep their model and data across messages (``client_dir``: where they
    keep their clients' personal state; default ``$FEDLORA_CLIENT_DIR`` or ``.fedlora-client``)."""
    from fedlora.engine.flower import client_app

    return client_app(build_client_node, config, client_dir)
