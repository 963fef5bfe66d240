"""Flower's simulation runtime (Ray) running a fedlora experiment in this machine's processes."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fedlora.config.schema import ExperimentConfig
from fedlora.engine.flower.environment import flower_log_level, quiet_flower


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


def client_resources(cfg: ExperimentConfig, num_nodes: int) -> dict[str, int | float]:
    """What each virtual client (ClientApp) asks Ray for: Flower's ``client-resources`` (FlowerTune's
    ``options.backend.client-resources.num-cpus`` / ``num-gpus``) from ``compute.flower_client_cpus`` /
    ``flower_client_gpus``; ``auto``: one CPU, and on a GPU an equal share of it among the ``num_nodes``
    clients of a round (0 on the CPU). Ray runs as many clients at once as the resources allow and waits
    forever for what the machine does not have, so asking for more CPUs than this process may use, or for a
    GPU on a run without one, is a ConfigError before Ray starts."""
    from fedlora.compute import resolve_device, usable_cores
    from fedlora.errors import ConfigError

    compute, device, cores = cfg.compute, resolve_device(cfg.compute.device), usable_cores()
    gpu = device.type == "cuda"
    cpus = 1 if compute.flower_client_cpus == "auto" else compute.flower_client_cpus
    gpus = compute.flower_client_gpus
    if gpus == "auto":
        gpus = 1.0 / num_nodes if gpu else 0.0
    if cpus > cores:
        raise ConfigError(
            f"compute.flower_client_cpus: {cpus} CPUs per client, but this machine lets the run use "
            f"{cores}: Ray would never start a client; ask for at most {cores}"
        )
    if gpus > 0 and not gpu:
        raise ConfigError(
            f"compute.flower_client_gpus: {gpus:g} GPUs per client on a run whose device is {device}: Ray "
            "would wait for a GPU forever; set 0 (or auto), or a CUDA device"
        )
    return {"num_cpus": cpus, "num_gpus": gpus}


def run_flower_simulation(
    cfg: ExperimentConfig, run_dir: Path, num_clients: int, server: Any, client: Any
) -> Path:
    """``engine: flower-sim``: the given apps on Flower's simulation runtime, one SuperNode per client a round
    samples (:func:`~fedlora.engine.flower.transport.simulation_nodes`; the server's ``assigned`` routing)."""
    quiet_flower()
    check_ray_disk()
    from flwr.simulation import run_simulation

    from fedlora.engine.flower.transport import simulation_nodes

    num_nodes = simulation_nodes(cfg.federation, num_clients)
    backend: dict[str, dict[str, Any]] = {
        "client_resources": client_resources(cfg, num_nodes),
        "init_args": {"logging_level": flower_log_level()},
    }
    run_simulation(server_app=server, client_app=client, num_supernodes=num_nodes, backend_config=backend)
    if not (run_dir / "global").exists():
        raise RuntimeError(f"the Flower simulation ended without finishing the run in {run_dir}")
    return run_dir
