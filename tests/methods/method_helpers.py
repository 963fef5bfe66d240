"""Helpers shared by the method tests of this folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from fedlora import load_config
from fedlora.adapters.ranks import RankProfile
from fedlora.engine.server import Server
from fedlora.runner import run_experiment
from fedlora.strategies.base import ClientReply, ServerSetup

A_KEY, B_KEY = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


D, K, R = 10, 12, 4


def setup_strategy(strategy, gen: torch.Generator) -> tuple[Server, dict[str, torch.Tensor]]:
    """The strategy started on a random A and B = 0 for 3 clients of rank R: (its server, the initial adapter)."""
    init = {A_KEY: torch.randn(R, K, generator=gen), B_KEY: torch.zeros(D, R)}
    server = Server(
        strategy, ServerSetup(init, {i: RankProfile.uniform(R) for i in range(3)}, lora_alpha=8.0)
    )
    return server, init


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


def dp_replies(tmp_path: Path, extra: dict) -> tuple[dict, dict, dict, dict]:
    """One client's round under the DP plan of ``extra`` (a DP config), trained three times from the same
    instruction and seed: at the plan's noise multiplier, and twice without noise. Returns (the payload it
    started from, the noisy reply's tensors, the two noise-free replies' tensors) and the trainable-state
    tensors the client held after the noisy round (what moved and what did not)."""
    import copy

    from fedlora.engine.embedded import EmbeddedEngine
    from fedlora.runner import build_simulation

    sim, _ = build_simulation(load_config(None, tiny_overrides(tmp_path, **extra)))
    engine = EmbeddedEngine(sim, tmp_path / "dp-run")
    instruction = sim.server.configure(1, [0])[0]
    engine.complete(instruction)
    assert instruction.settings["privacy"]["noise_multiplier"] > 0
    quiet = copy.deepcopy(instruction)
    quiet.settings["privacy"] = {**quiet.settings["privacy"], "noise_multiplier": 0.0}
    noisy = sim.node.train(1, 0, instruction).payload
    held = sim.adapters.state()
    plain = [sim.node.train(1, 0, copy.deepcopy(quiet)).payload for _ in range(2)]
    return instruction.payload, noisy, held, {"first": plain[0], "second": plain[1]}


def assert_noise_reaches_only(trained: set[str], payload: dict, noisy: dict, held: dict, plain: dict) -> None:
    """The reply holds exactly the ``trained`` tensors; without noise two trainings agree bit for bit, with
    noise every trained tensor differs from them; every other tensor the client held kept the payload's value."""
    assert set(noisy) == trained == set(plain["first"])
    assert all(torch.equal(plain["first"][k], plain["second"][k]) for k in trained)  # deterministic
    for key in trained:
        moved = torch.linalg.norm((noisy[key] - plain["first"][key]).double())
        assert moved > 1e-3 * torch.linalg.norm(plain["first"][key].double()), key
    frozen = [k for k in payload if k in held and k not in trained]
    assert frozen and all(torch.equal(held[k], payload[k]) for k in frozen)
