"""What a run folder records about itself: ``clients.json`` and ``run.json``."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedlora.compute import describe_machine, model_device
from fedlora.engine.run_folder import atomic_write_chunks, atomic_write_text, read_run_info, sha256_bytes
from fedlora.engine.transport import Simulation
from fedlora.models.loading import ModelBundle
from fedlora.version import __version__


def rank_summary(sim: Simulation) -> str:
    """``r8`` (one profile) or ``ranks a30-m200 x3, r8 x12`` (clients per rank profile)."""
    counts = Counter(p.name for p in sim.server.client_profiles.values())
    if len(counts) == 1:
        return next(iter(counts))
    return "ranks " + ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))


def scaling_summary(sim: Simulation) -> str:
    """``alpha=16`` (s_r = alpha / r, or alpha / sqrt(r)), or ``scale=2`` (one constant at every rank)."""
    adapter = sim.adapters.cfg
    return f"scale={adapter.scale:g}" if adapter.scale is not None else f"alpha={adapter.alpha:g}"


def write_run_info(
    run_dir: Path,
    sim: Simulation,
    bundle: ModelBundle,
    changes: dict[str, Any],
    start_round: int,
    effective_config: str | None = None,
) -> None:
    """``clients.json`` (each client's name and split sizes) and ``run.json`` (what export needs, the
    config's checksum, and the changes each resume made, with the checksum of ``effective_config``, the
    config text a resume with changes writes to ``config.yaml``), both written atomically."""

    def entries() -> Iterator[dict[str, Any]]:
        for c in sim.federation.clients:
            entry = {
                "client": c.client_id,
                "name": c.name,
                "train": c.size("train"),
                "eval": c.size("eval"),
                "test": c.size("test"),
                "rank": sim.server.client_profiles[c.client_id].name,
            }
            if sim.client_models is not None:
                entry["model"] = sim.client_models.labels[sim.client_models.variant_of[c.client_id]]
            yield entry
        for c in sim.federation.held_out:
            yield {
                "client": c.client_id,
                "name": c.name,
                "test": c.size("test"),
                "eval": c.size("eval"),
                "held_out": True,
            }

    def chunks() -> Iterator[bytes]:  # a JSON list, one client a line, streamed
        yield b"["
        for number, entry in enumerate(entries()):
            yield (",\n" if number else "\n").encode() + json.dumps(entry).encode()
        yield b"\n]"

    atomic_write_chunks(run_dir / "clients.json", chunks())
    info: dict[str, Any] = {
        "fedlora_version": __version__,
        "base_model": str(bundle.folder.resolve()),  # the local copy the run trained on
        "base_model_id": bundle.base_model_id,  # what global/adapter_config.json names (a hub id where known)
        "task": bundle.task,
        "label_names": sim.federation.label_names,
        "data": sim.federation.description,
        "dropped_empty_clients": sim.federation.dropped_empty,
        "precision": sim.plan.precision,  # compute.precision as it ran (auto resolved)
    }
    previous = read_run_info(run_dir)
    info["config_sha256"] = previous.get("config_sha256") or sha256_bytes(
        (run_dir / "config.yaml").read_bytes()
    )
    info["resumes"] = previous.get("resumes", [])
    if changes:
        resume: dict[str, Any] = {"from_round": start_round, "changes": changes}
        if effective_config is not None:  # config.yaml is rewritten to it next (write_effective_config)
            resume["config_sha256"] = sha256_bytes(effective_config.encode("utf-8"))
        info["resumes"].append(resume)
    # the machine of every start and resume: a run resumed elsewhere measured its rounds' seconds on several
    info["machines"] = [
        *(m for m in previous.get("machines", []) if m.get("from_round", 0) < start_round),
        {"from_round": start_round, **describe_machine(model_device(bundle.model))},
    ]
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=1))
