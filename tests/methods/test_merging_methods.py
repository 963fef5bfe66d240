"""FedEx-LoRA and FLoRA (methods that merge into the base weights): the merged model against a dense
computation, the merge history rebuilt bit for bit, runs, resumes, Flower, refusals."""

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
    merged_offset,
    replies_for,
    rounds,
    run_and_resume_exactly,
    setup_strategy,
    weights,
)
from safetensors.torch import load_file

from conftest import assert_rel_close, relative_error, tiny_overrides
from fedlora import load_config
from fedlora.adapters.ranks import RankProfile
from fedlora.engine.server import Server
from fedlora.models.loading import load_base_model
from fedlora.runner import run_experiment
from fedlora.strategies.base import ClientReply, ServerSetup
from fedlora.strategies.merging import merge_history


def test_fedex_lora_model_is_exactly_the_weighted_average_of_the_client_models() -> None:
    from fedlora.strategies.fedex_lora import FedExLoRA

    gen = torch.Generator().manual_seed(6)
    strategy = FedExLoRA()
    server, _ = setup_strategy(strategy, gen)
    s = 8.0 / R
    for server_round in (1, 2, 3):
        before = merged_offset(server.evaluation_state())
        instruction = server.configure(server_round, [0])[0]
        replies = replies_for([A_KEY, B_KEY], gen)
        assert all(server.validate_reply(instruction, r) is None for r in replies)
        server.aggregate(server_round, replies)
        # client i's model: W0 + D + s B_i A_i; the new global model must be their p-weighted average
        ideal = before + sum(
            p * s * r.payload[B_KEY].double() @ r.payload[A_KEY].double()
            for p, r in zip(weights(replies), replies)
        )
        state = server.evaluation_state()
        B, A = state[B_KEY].double(), state[A_KEY].double()
        assert_rel_close(merged_offset(state) + s * B @ A, ideal, 1e-6)
        assert relative_error(before + s * B @ A, ideal) > 1e-2  # averaging the factors alone is not exact
        increments = merge_history(server.state).increments
        P, Q = increments[-1][1]["m.q_proj"] if increments else (None, None)
        if P is not None:
            assert P.shape == (D, 4 * R) and Q.shape == (4 * R, K)  # factored: rank (K + 1) r, not d x k


def test_flora_stack_is_the_exact_sum_with_heterogeneous_ranks_and_fresh_adapters() -> None:
    from fedlora.strategies.flora import FLoRA

    gen = torch.Generator().manual_seed(7)
    ranks = {0: 2, 1: 4, 2: 3}
    strategy = FLoRA()
    init = {A_KEY: torch.randn(4, K, generator=gen), B_KEY: torch.zeros(D, 4)}
    server = Server(
        strategy, ServerSetup(init, {i: RankProfile.uniform(r) for i, r in ranks.items()}, lora_alpha=8.0)
    )
    for server_round in (1, 2):
        before = merged_offset(server.evaluation_state())
        instructions = server.configure(server_round, [0, 1, 2])
        for cid, instruction in instructions.items():
            assert instruction.payload[A_KEY].shape == (ranks[cid], K)
            assert torch.count_nonzero(instruction.payload[B_KEY]) == 0  # a fresh LoRA: B = 0
        replies = [
            ClientReply(
                cid,
                {
                    A_KEY: torch.randn(r, K, generator=gen),
                    B_KEY: torch.randn(D, r, generator=gen),
                },
                n,
            )
            for (cid, r), n in zip(ranks.items(), (2, 5, 9))
        ]
        assert all(server.validate_reply(instructions[r.client_id], r) is None for r in replies)
        server.aggregate(server_round, replies)
        ideal = before + sum(
            p * (8.0 / ranks[r.client_id]) * r.payload[B_KEY].double() @ r.payload[A_KEY].double()
            for p, r in zip(weights(replies), replies)
        )
        state = server.evaluation_state()
        assert torch.count_nonzero(state[B_KEY]) == 0
        assert_rel_close(merged_offset(state), ideal, 1e-6)
    fresh = server.configure(3, [1])[1].payload[A_KEY]
    assert not torch.equal(fresh, server.configure(2, [1])[1].payload[A_KEY])  # redrawn each round
    assert float(fresh.abs().max()) <= 1 / K**0.5  # PEFT's kaiming-uniform bound 1/sqrt(k)


def test_merge_history_folds_into_a_snapshot_and_nodes_rebuild_it_bit_for_bit() -> None:
    from fedlora.adapters.merged import MergedBase, MergeHistory, nbytes

    gen = torch.Generator().manual_seed(8)
    history = MergeHistory()
    W0 = torch.randn(D, K, generator=gen)
    dense = torch.zeros(D, K, dtype=torch.float64)
    incremental_node, weight = MergedBase(), W0.clone()
    payloads = []
    for t in range(1, 8):
        P, Q = torch.randn(D, 3, generator=gen), torch.randn(3, K, generator=gen)
        history.add(t, {"m": (P, Q)})
        dense += P.double() @ Q.double()
        payload = history.payload()
        payloads.append(payload)
        assert nbytes(payload) <= 2 * D * K * 4 + 64  # never much more than the dense offset
        incremental_node.apply({"m": weight}, payload)
        fresh_weight = W0.clone()
        MergedBase().apply({"m": fresh_weight}, payload)
        assert torch.equal(weight, fresh_weight)  # a node that saw every round = a fresh one (a resume)
        assert_rel_close(weight.double() - W0.double(), dense, 1e-6)
    assert history.snapshot_round > 0  # the increments outweighed D x K at some round and were folded
    restored = MergeHistory.from_tensors(history.tensors())
    assert all(torch.equal(restored.payload()[k], payloads[-1][k]) for k in payloads[-1])
    incremental_node.apply({"m": weight}, {})  # a state without an offset: back to the pristine base
    assert torch.equal(weight, W0)


@pytest.mark.parametrize("method", ["fedex-lora", "flora"])
def test_merging_methods_run_resume_exactly_and_export_a_merged_model(tmp_path: Path, method: str) -> None:
    from transformers import AutoModelForCausalLM

    base = {"strategy.name": method, "federation.clients_per_round": 3, "federation.rounds": 3}
    if method == "flora":
        base["resources.distribution"] = "custom"
        base["resources.rank_types"] = "[{attention: 2, mlp: 2}, {attention: 4, mlp: 4}]"
        base["resources.shares"] = "[0.5, 0.5]"
    straight = run_and_resume_exactly(tmp_path, base)
    records = rounds(straight)
    assert all(r["status"] == "aggregated" for r in records)
    assert records[1]["bytes_down"] > records[0]["bytes_down"]  # the merged offset travels from round 2
    from fedlora.cli import main

    assert main(["export", str(straight), "--merged", str(tmp_path / "m")]) == 0  # already merged: says so
    cfg = load_config(None, tiny_overrides(tmp_path, **base))
    bundle = load_base_model(cfg.model)
    exported = AutoModelForCausalLM.from_pretrained(straight / "global")  # plain transformers
    ids = torch.tensor([[1, 5, 9, 13, 70, 200]])
    with torch.no_grad():
        theirs = exported(input_ids=ids).logits
        untouched = bundle.model(input_ids=ids).logits
    assert relative_error(theirs, untouched) > 1e-4  # training moved the merged model
    # our own model with the run's final server state (its last checkpoint) loaded gives the same logits
    from fedlora.adapters import LoraAdapters
    from fedlora.engine.checkpoint import latest_checkpoint
    from fedlora.engine.server import state_from_checkpoint

    checkpoint = latest_checkpoint(straight / "checkpoints")
    assert checkpoint is not None
    state = state_from_checkpoint(checkpoint.tensors, checkpoint.meta)
    adapters = LoraAdapters(bundle.model, cfg.adapter, "causal-lm")
    adapters.load({**state.adapter, **merge_history(state).payload()})
    with torch.no_grad():
        ours = adapters.model(input_ids=ids).logits
    assert_rel_close(ours, theirs, 1e-5)


@pytest.mark.parametrize("method", ["fedex-lora", "flora"])
def test_merging_methods_on_flower_match_the_embedded_engine(tmp_path: Path, method: str) -> None:
    base = {"strategy.name": method, "federation.clients_per_round": 2, "federation.rounds": 2}
    flower = load_config(None, tiny_overrides(tmp_path, **base, engine="flower-sim"))
    run_experiment(flower, tmp_path / "flower", show_progress=False)
    run_experiment(
        load_config(None, tiny_overrides(tmp_path, **base)), tmp_path / "embedded", show_progress=False
    )
    fm = load_file(str(tmp_path / "flower" / "global" / "model.safetensors"))
    em = load_file(str(tmp_path / "embedded" / "global" / "model.safetensors"))
    assert fm.keys() == em.keys()
    for k in em:
        assert_rel_close(fm[k], em[k], 1e-5)
    assert rounds(tmp_path / "flower")[1]["bytes_down"] == rounds(tmp_path / "embedded")[1]["bytes_down"]


def test_merging_methods_refuse_what_they_cannot_do_exactly(tmp_path: Path) -> None:
    from fedlora.config.loader import ConfigError

    hetero = {
        "strategy.name": "fedex-lora",
        "resources.distribution": "custom",
        "resources.rank_types": "[{attention: 2, mlp: 2}, {attention: 4, mlp: 4}]",
        "resources.shares": "[0.5, 0.5]",
    }
    with pytest.raises(ConfigError, match="fedex-lora averages A and B separately and needs one rank"):
        run_experiment(
            load_config(None, tiny_overrides(tmp_path, **hetero)), tmp_path / "h", show_progress=False
        )
    classify = {"strategy.name": "flora", "model.task": "classification", "data.source": "bbc-news"}
    with pytest.raises(ConfigError, match="strategy flora merges into the base weights"):
        load_config(None, tiny_overrides(tmp_path, **classify))
