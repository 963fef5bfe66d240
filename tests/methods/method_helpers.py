"""Helpers shared by the method tests of this folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from fedlora import load_config
from fedlora.adapters.ranks import RankProfile
from fedlora.runner import run_experiment
from fedlora.strategies.base import ClientReply, ServerSetup

A_KEY, B_KEY = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


D, K, R = 10, 12, 4


def setup_strategy(strategy, gen: torch.Generator):
    init = {A_KEY: torch.randn(R, K, generator=gen), B_KEY: torch.zeros(D, R)}
    strategy.initialize(ServerSetup(init, {i: RankProfile.uniform(R) for i in range(3)}, lora_alpha=8.0))
    return init


def replies_for(keys: list[str], gen: torch.Generator, sizes=(2, 5, 9)) -> list[ClientReply]:
    shapes = {A_KEY: (R, K), B_KEY: (D, R)}
    return [
        ClientReply(i, {k: torch.randn(*shapes[k], generator=gen) for k in keys}, n)
        for i, n in enumerate(sizes)
    ]


def weights(replies: list[ClientReply]) -> list[float]:
    total = sum(r.num_examples for r in replies)
    return [r.num_examples / total for r in replies]


def run_and_resume_exactly(tmp_path: Path, base: dict) -> Path:
    """Run ``base`` straight, and again stopped after round 2 and resumed: the global adapters must be equal
    bit for bit. Returns the straight run's folder."""
    straight = run_experiment(
        load_config(None, tiny_overrides(tmp_path, **base)), tmp_path / "s", show_progress=False
    )
    short = {**base, "federation.rounds": 2}
    run_experiment(load_config(None, tiny_overrides(tmp_path, **short)), tmp_path / "r", show_progress=False)
    run_experiment(
        load_config(None, tiny_overrides(tmp_path, **base)), tmp_path / "r", resume=True, show_progress=False
    )
    name = (
        "model.safetensors"
        if (straight / "global" / "model.safetensors").exists()
        else "adapter_model.safetensors"
    )
    a = load_file(str(straight / "global" / name))  # a merged model folder, or a PEFT adapter
    b = load_file(str(tmp_path / "r" / "global" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return straight


def rounds(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# --- FedEx-LoRA and FLoRA: updates merged into the base weights -------------------------------------------
def merged_offset(payload: dict[str, torch.Tensor], module: str = "m.q_proj") -> torch.Tensor:
    """D of ``module`` rebuilt in float64 from a payload's merged tensors (snapshot + increments)."""
    from fedlora.adapters.merged import ROUNDS, increment

    offset = payload.get(f"merged.snapshot.{module}", torch.zeros(D, K)).double()
    for t in payload[ROUNDS].tolist():
        P, Q = increment(payload, t)[module]
        offset = offset + P.double() @ Q.double()
    return offset
