"""FedKSeed: the coefficients against a direct replay of the clients' updates; kilobytes down, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from method_helpers import (
    A_KEY,
    B_KEY,
    D,
    K,
    R,
    rounds,
    run_and_resume_exactly,
    weights,
)
from safetensors.torch import load_file

from conftest import assert_rel_close, tiny_overrides
from fedlora import load_config
from fedlora.adapters.ranks import RankProfile
from fedlora.engine.server import Server
from fedlora.runner import run_experiment
from fedlora.strategies.base import ClientReply, ServerSetup


# --- FedKSeed ------------------------------------------------------------------------------------------
def test_fedkseed_coefficients_equal_the_weighted_average_of_replayed_updates() -> None:
    from fedlora.client.zeroth_order import replay, steps_record
    from fedlora.strategies.fedkseed import COEFFICIENTS_KEY, FedKSeed, FedKSeedOptions, seed_pool

    gen = torch.Generator().manual_seed(5)
    strategy = FedKSeed(FedKSeedOptions(pool_size=16, perturbations=2))
    init = {
        A_KEY: torch.randn(R, K, generator=gen, dtype=torch.float64),
        B_KEY: torch.zeros(D, R, dtype=torch.float64),
    }
    server = Server(
        strategy, ServerSetup(init, {i: RankProfile.uniform(R) for i in range(3)}, lora_alpha=8.0, seed=3)
    )
    instruction = server.configure(1, [0])[0]
    assert list(instruction.payload) == [COEFFICIENTS_KEY] and instruction.payload[
        COEFFICIENTS_KEY
    ].shape == (16,)
    pool = seed_pool(3, 16)
    replies = []
    for i, n in enumerate((2, 5, 9)):  # 3 steps x 2 perturbations each, seeds from the pool
        seeds = [[pool[int(torch.randint(16, (1,), generator=gen))] for _ in range(2)] for _ in range(3)]
        grads = torch.randn(3, 2, generator=gen, dtype=torch.float64).tolist()
        replies.append(ClientReply(i, steps_record(seeds, grads, [0.01, 0.02, 0.03], 0.0), n))
    assert all(server.validate_reply(instruction, r) is None for r in replies)
    server.aggregate(1, replies)
    got = server.evaluation_state()
    # the dense reference: each client's adapter replayed from theta_0, averaged with example weights
    ends = [replay(init, r.payload, eps=1e-3, weight_decay=0.0) for r in replies]
    for key in init:
        dense = sum(p * (end[key] - init[key]) for p, end in zip(weights(replies), ends)) + init[key]
        assert_rel_close(got[key], dense, 1e-9)
    outside = steps_record([[123, 456]], [[0.1, 0.2]], [0.01], 0.0)
    assert "outside the run's pool" in server.validate_reply(instruction, ClientReply(0, outside, 2))


def test_fedkseed_runs_downloads_bytes_not_megabytes_and_resumes_exactly(tmp_path: Path) -> None:
    base = {
        "strategy.name": "fedkseed",
        "strategy.options": "{pool_size: 64}",
        "client.lr": 1e-4,
        "federation.rounds": 3,
    }
    records = rounds(run_and_resume_exactly(tmp_path, base))
    per_client_down = records[0]["bytes_down"] / records[0]["num_sampled"]
    assert per_client_down < 1024  # 64 float64 coefficients and a header, not an adapter
    assert all(r["bytes_up"] < 2048 for r in records)
    assert records[-1]["fedkseed_seeds_used"] > 0 and records[-1]["eval_loss"] == records[-1]["eval_loss"]
    two = {**base, "federation.rounds": 2}  # on Flower's simulation runtime: the same global adapter
    run_experiment(
        load_config(None, tiny_overrides(tmp_path, **two, engine="flower-sim")),
        tmp_path / "f",
        show_progress=False,
    )
    run_experiment(load_config(None, tiny_overrides(tmp_path, **two)), tmp_path / "e", show_progress=False)
    flower, embedded = (
        load_file(str(tmp_path / d / "global" / "adapter_model.safetensors")) for d in ("f", "e")
    )
    for key in embedded:
        assert_rel_close(flower[key], embedded[key], 1e-5)
    with pytest.raises(Exception, match="client.weight_decay"):
        load_config(None, tiny_overrides(tmp_path, **{**base, "client.weight_decay": 0.01}))


def test_a_step_with_a_non_finite_loss_moves_nothing_under_fedkseed() -> None:
    """The reference trainer skips a step whose loss is NaN: with skip_nonfinite the step is recorded with
    g = 0 and lr 0 and leaves theta as it was, and the replay (what the server rebuilds) agrees; without it
    the NaN reaches the weights. FedKSeed's client hook skips by default."""
    from fedlora.client.zeroth_order import GRADS_KEY, LRS_KEY, replay, train_zeroth_order
    from fedlora.strategies.fedkseed import FedKSeed

    gen = torch.Generator().manual_seed(3)
    start = {"w": torch.randn(4, 3, generator=gen)}

    def run(skip: bool):
        state = {k: v.clone() for k, v in start.items()}
        calls = iter(range(100))

        def loss_fn() -> float:  # step 1's two evaluations are NaN, the others a smooth loss
            n = next(calls)
            return float("nan") if n in (2, 3) else float((state["w"] ** 2).sum())

        record, metrics = train_zeroth_order(
            list(state.items()), [loss_fn] * 3, 11, 1e-3, 0.1, 0.0, 1, skip_nonfinite=skip
        )
        return state, record, metrics

    state, record, metrics = run(skip=True)
    assert record[LRS_KEY].tolist() == [0.1, 0.0, 0.1] and record[GRADS_KEY][1].tolist() == [0.0]
    assert metrics["skipped_steps"] == 1 and torch.isfinite(state["w"]).all()
    assert torch.equal(replay(start, record, 1e-3, 0.0)["w"], state["w"])  # the server rebuilds the same
    unskipped, _, _ = run(skip=False)
    assert torch.isnan(unskipped["w"]).all()
    assert FedKSeed.Options().skip_nan_steps  # FedKSeed's default: skip, as the reference
