"""RoLoRA, FedSVD, LoRA-FAIR: server rules against a direct dense computation on random inputs, what
travels, and end-to-end runs (embedded, Flower simulation, resume, DP, plain-PEFT export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import assert_rel_close, relative_error, tiny_overrides
from fedlora import load_config
from fedlora.adapters.ranks import RankProfile
from fedlora.client.frozen import FreezeFactor
from fedlora.models.loading import load_base_model
from fedlora.runner import run_experiment
from fedlora.strategies.base import ClientReply, ServerSetup
from fedlora.strategies.fedsvd import FedSVD
from fedlora.strategies.lora_fair import LoRAFAIR, corrected_b
from fedlora.strategies.rolora import RoLoRA

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


def test_rolora_alternates_and_its_average_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    strategy = RoLoRA()
    init = setup_strategy(strategy, gen)
    first = strategy.configure(1, [0])[0]
    assert first.hooks == [FreezeFactor(factor="A")] and set(first.payload) == {A_KEY, B_KEY}
    both = ClientReply(0, {A_KEY: init[A_KEY], B_KEY: torch.ones(D, R)}, 2)
    assert "unexpected" in (strategy.validate_reply(first, both) or "")  # A was frozen: it must not come back
    replies = replies_for([B_KEY], gen)
    assert all(strategy.validate_reply(first, r) is None for r in replies)
    strategy.aggregate(1, replies)
    dense = sum(
        p * (r.payload[B_KEY].double() @ init[A_KEY].double()) for p, r in zip(weights(replies), replies)
    )
    got = strategy.global_state[B_KEY].double() @ strategy.global_state[A_KEY].double()
    assert_rel_close(got, dense, 1e-6)  # sum_i p_i B_i A == B_bar A
    assert torch.equal(strategy.global_state[A_KEY], init[A_KEY])
    second = strategy.configure(2, [0])[0]
    assert second.hooks == [FreezeFactor(factor="B")]
    B = strategy.global_state[B_KEY].clone()
    replies = replies_for([A_KEY], gen)
    strategy.aggregate(2, replies)
    dense = sum(p * (B.double() @ r.payload[A_KEY].double()) for p, r in zip(weights(replies), replies))
    got = strategy.global_state[B_KEY].double() @ strategy.global_state[A_KEY].double()
    assert_rel_close(got, dense, 1e-6)


def test_fedsvd_rebases_exactly_with_orthonormal_a() -> None:
    gen = torch.Generator().manual_seed(1)
    strategy = FedSVD()
    init = setup_strategy(strategy, gen)
    instruction = strategy.configure(1, [0])[0]
    assert instruction.hooks == [FreezeFactor(factor="A")]
    replies = replies_for([B_KEY], gen)
    strategy.aggregate(1, replies)
    dense = sum(
        p * (r.payload[B_KEY].double() @ init[A_KEY].double()) for p, r in zip(weights(replies), replies)
    )
    A, B = strategy.global_state[A_KEY].double(), strategy.global_state[B_KEY].double()
    assert_rel_close(B @ A, dense, 1e-5)  # the re-basing keeps the product
    assert_rel_close(A @ A.T, torch.eye(R, dtype=torch.float64), 1e-5)  # orthonormal rows
    norms = B.norm(dim=0)
    assert torch.all(norms[:-1] >= norms[1:] - 1e-6)  # B = U S: columns by decreasing singular value


def test_fedsvd_completes_a_rank_deficient_round() -> None:
    gen = torch.Generator().manual_seed(2)
    strategy = FedSVD()
    init = setup_strategy(strategy, gen)
    low = torch.randn(D, 1, generator=gen) @ torch.randn(1, R, generator=gen)  # B_bar of rank 1
    strategy.aggregate(1, [ClientReply(0, {B_KEY: low}, 3)])
    A, B = strategy.global_state[A_KEY].double(), strategy.global_state[B_KEY].double()
    assert_rel_close(B @ A, low.double() @ init[A_KEY].double(), 1e-5)
    assert_rel_close(A @ A.T, torch.eye(R, dtype=torch.float64), 1e-5)
    assert torch.count_nonzero(B[:, 1:].abs() > 1e-6) == 0


def test_lora_fair_correction_is_the_regularised_least_squares_solution() -> None:
    gen = torch.Generator().manual_seed(3)
    Bs = [torch.randn(D, R, generator=gen, dtype=torch.float64) for _ in range(3)]
    As = [torch.randn(R, K, generator=gen, dtype=torch.float64) for _ in range(3)]
    p = [0.2, 0.3, 0.5]
    for reg in (0.0, 1e-3, 1.0):
        B_new, A_bar = corrected_b(Bs, As, p, reg)
        delta = sum(w * B @ A for w, B, A in zip(p, Bs, As))  # the dense ideal update, d x k
        B_bar = sum(w * B for w, B in zip(p, Bs))
        lam = reg * float(torch.trace(A_bar @ A_bar.T)) / R
        # normal equations of min ||delta - B A_bar||^2 + lam ||B - B_bar||^2, stacked as one least squares
        stacked_a = torch.cat([A_bar, (lam**0.5) * torch.eye(R, dtype=torch.float64)], dim=1)
        stacked_t = torch.cat([delta, (lam**0.5) * B_bar], dim=1)
        dense = torch.linalg.lstsq(stacked_a.T, stacked_t.T).solution.T
        assert_rel_close(B_new, dense, 1e-8)
        assert_rel_close(A_bar, sum(w * A for w, A in zip(p, As)), 1e-12)
        plain = float((delta - B_bar @ A_bar).norm())
        assert float((delta - B_new @ A_bar).norm()) <= plain + 1e-9  # never further from the ideal update


def test_lora_fair_strategy_applies_the_rule_per_module() -> None:
    gen = torch.Generator().manual_seed(4)
    strategy = LoRAFAIR()
    setup_strategy(strategy, gen)
    replies = replies_for([A_KEY, B_KEY], gen)
    strategy.aggregate(1, replies)
    p = weights(replies)
    B_new, A_bar = corrected_b(
        [r.payload[B_KEY].double() for r in replies], [r.payload[A_KEY].double() for r in replies], p, 1e-3
    )
    assert_rel_close(strategy.global_state[B_KEY], B_new, 1e-6)
    assert_rel_close(strategy.global_state[A_KEY], A_bar, 1e-6)


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


@pytest.mark.parametrize("method", ["rolora", "fedsvd", "lora-fair", "fed-sb"])
def test_runs_embedded_and_on_flower_and_resumes_exactly(tmp_path: Path, method: str) -> None:
    base = {"strategy.name": method, "federation.clients_per_round": 3, "federation.rounds": 3}
    straight = run_and_resume_exactly(tmp_path, base)
    records = rounds(straight)
    fedit = run_experiment(
        load_config(
            None, tiny_overrides(tmp_path, **{**base, "strategy.name": "fedit", "federation.rounds": 1})
        ),
        tmp_path / "fedit",
        show_progress=False,
    )
    fedit_up = rounds(fedit)[0]["bytes_up"]
    if method in ("rolora", "fedsvd"):  # one factor up: B (d x r) or A (r x k), never both
        assert all(r["bytes_up"] < 0.75 * fedit_up for r in records)
    elif method == "fed-sb":  # r x r cores only
        assert all(r["bytes_up"] < 0.2 * fedit_up for r in records)
    else:
        assert records[0]["bytes_up"] == fedit_up
    assert all(r["bytes_down"] == records[0]["bytes_down"] for r in records)
    flower = load_config(
        None, tiny_overrides(tmp_path, **{**base, "federation.rounds": 2}, engine="flower-sim")
    )
    run_experiment(flower, tmp_path / "flower", show_progress=False)
    embedded = load_config(None, tiny_overrides(tmp_path, **{**base, "federation.rounds": 2}))
    run_experiment(embedded, tmp_path / "embedded", show_progress=False)
    fa = load_file(str(tmp_path / "flower" / "global" / "adapter_model.safetensors"))
    ea = load_file(str(tmp_path / "embedded" / "global" / "adapter_model.safetensors"))
    for k in ea:
        assert_rel_close(fa[k], ea[k], 1e-5)


@pytest.mark.parametrize("method", ["rolora", "fedsvd"])
def test_dp_sgd_on_the_trained_factor_and_a_plain_peft_export(tmp_path: Path, method: str) -> None:
    extra = {"strategy.name": method, "privacy.enabled": "true", "privacy.noise_multiplier": 0.8}
    run_dir = run_experiment(
        load_config(None, tiny_overrides(tmp_path, **extra)), tmp_path / "dp", show_progress=False
    )
    records = rounds(run_dir)
    assert all(r["status"] == "aggregated" for r in records) and "epsilon" in json.dumps(records[-1])
    cfg = load_config(None, tiny_overrides(tmp_path, **extra))
    bundle = load_base_model(cfg.model)
    model = PeftModel.from_pretrained(bundle.model, str(run_dir / "global"))
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


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
    strategy.initialize(
        ServerSetup(init, {i: RankProfile.uniform(R) for i in range(3)}, lora_alpha=8.0, seed=3)
    )
    instruction = strategy.configure(1, [0])[0]
    assert list(instruction.payload) == [COEFFICIENTS_KEY] and instruction.payload[
        COEFFICIENTS_KEY
    ].shape == (16,)
    pool = seed_pool(3, 16)
    replies = []
    for i, n in enumerate((2, 5, 9)):  # 3 steps x 2 perturbations each, seeds from the pool
        seeds = [[pool[int(torch.randint(16, (1,), generator=gen))] for _ in range(2)] for _ in range(3)]
        grads = torch.randn(3, 2, generator=gen, dtype=torch.float64).tolist()
        replies.append(ClientReply(i, steps_record(seeds, grads, [0.01, 0.02, 0.03], 0.0), n))
    assert all(strategy.validate_reply(instruction, r) is None for r in replies)
    strategy.aggregate(1, replies)
    got = strategy.evaluation_state()
    # the dense reference: each client's adapter replayed from theta_0, averaged with example weights
    ends = [replay(init, r.payload, eps=1e-3, weight_decay=0.0) for r in replies]
    for key in init:
        dense = sum(p * (end[key] - init[key]) for p, end in zip(weights(replies), ends)) + init[key]
        assert_rel_close(got[key], dense, 1e-9)
    outside = steps_record([[123, 456]], [[0.1, 0.2]], [0.01], 0.0)
    assert "outside the run's pool" in strategy.validate_reply(instruction, ClientReply(0, outside, 2))


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


# --- FedEx-LoRA and FLoRA: updates merged into the base weights -------------------------------------------
def merged_offset(payload: dict[str, torch.Tensor], module: str = "m.q_proj") -> torch.Tensor:
    """D of ``module`` rebuilt in float64 from a payload's merged tensors (snapshot + increments)."""
    from fedlora.adapters.merged import ROUNDS, increment

    offset = payload.get(f"merged.snapshot.{module}", torch.zeros(D, K)).double()
    for t in payload[ROUNDS].tolist():
        P, Q = increment(payload, t)[module]
        offset = offset + P.double() @ Q.double()
    return offset


def test_fedex_lora_model_is_exactly_the_weighted_average_of_the_client_models() -> None:
    from fedlora.strategies.fedex_lora import FedExLoRA

    gen = torch.Generator().manual_seed(6)
    strategy = FedExLoRA()
    setup_strategy(strategy, gen)
    s = 8.0 / R
    for server_round in (1, 2, 3):
        before = merged_offset(strategy.evaluation_state())
        instruction = strategy.configure(server_round, [0])[0]
        replies = replies_for([A_KEY, B_KEY], gen)
        assert all(strategy.validate_reply(instruction, r) is None for r in replies)
        strategy.aggregate(server_round, replies)
        # client i's model: W0 + D + s B_i A_i; the new global model must be their p-weighted average
        ideal = before + sum(
            p * s * r.payload[B_KEY].double() @ r.payload[A_KEY].double()
            for p, r in zip(weights(replies), replies)
        )
        state = strategy.evaluation_state()
        B, A = state[B_KEY].double(), state[A_KEY].double()
        assert_rel_close(merged_offset(state) + s * B @ A, ideal, 1e-6)
        assert relative_error(before + s * B @ A, ideal) > 1e-2  # averaging the factors alone is not exact
        P, Q = strategy.history.increments[-1][1]["m.q_proj"] if strategy.history.increments else (None, None)
        if P is not None:
            assert P.shape == (D, 4 * R) and Q.shape == (4 * R, K)  # factored: rank (K + 1) r, not d x k


def test_flora_stack_is_the_exact_sum_with_heterogeneous_ranks_and_fresh_adapters() -> None:
    from fedlora.strategies.flora import FLoRA

    gen = torch.Generator().manual_seed(7)
    ranks = {0: 2, 1: 4, 2: 3}
    strategy = FLoRA()
    init = {A_KEY: torch.randn(4, K, generator=gen), B_KEY: torch.zeros(D, 4)}
    strategy.initialize(
        ServerSetup(init, {i: RankProfile.uniform(r) for i, r in ranks.items()}, lora_alpha=8.0)
    )
    for server_round in (1, 2):
        before = merged_offset(strategy.evaluation_state())
        instructions = strategy.configure(server_round, [0, 1, 2])
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
        assert all(strategy.validate_reply(instructions[r.client_id], r) is None for r in replies)
        strategy.aggregate(server_round, replies)
        ideal = before + sum(
            p * (8.0 / ranks[r.client_id]) * r.payload[B_KEY].double() @ r.payload[A_KEY].double()
            for p, r in zip(weights(replies), replies)
        )
        state = strategy.evaluation_state()
        assert torch.count_nonzero(state[B_KEY]) == 0
        assert_rel_close(merged_offset(state), ideal, 1e-6)
    fresh = strategy.configure(3, [1])[1].payload[A_KEY]
    assert not torch.equal(fresh, strategy.configure(2, [1])[1].payload[A_KEY])  # redrawn each round
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
    from fedlora.adapters.merged import MergeHistory, split_merged
    from fedlora.engine.checkpoint import latest_checkpoint

    server = latest_checkpoint(straight / "checkpoints").tensors
    adapters = LoraAdapters(bundle.model, cfg.adapter, "causal-lm")
    adapter, _ = split_merged(server)
    adapters.load({**adapter, **MergeHistory.from_tensors(server).payload()})
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


# --- Fed-SB ---------------------------------------------------------------------------------------------
def test_fed_sb_averages_the_cores_exactly_and_exports_b_times_r() -> None:
    from fedlora.strategies.fed_sb import FedSB, latent_key

    gen = torch.Generator().manual_seed(9)
    strategy = FedSB()
    init = {
        A_KEY: torch.randn(R, K, generator=gen),
        B_KEY: torch.linalg.qr(torch.randn(D, R, generator=gen))[0],
        latent_key("m.q_proj"): torch.zeros(R, R),
    }
    strategy.initialize(ServerSetup(init, {i: RankProfile.uniform(R) for i in range(3)}, lora_alpha=8.0))
    instruction = strategy.configure(1, [0])[0]
    replies = [
        ClientReply(i, {latent_key("m.q_proj"): torch.randn(R, R, generator=gen)}, n)
        for i, n in enumerate((2, 5, 9))
    ]
    assert all(strategy.validate_reply(instruction, r) is None for r in replies)
    with_factors = ClientReply(0, {**replies[0].payload, B_KEY: init[B_KEY]}, 2)
    assert "unexpected" in (strategy.validate_reply(instruction, with_factors) or "")  # B is frozen, unsent
    strategy.aggregate(1, replies)
    B, A = init[B_KEY].double(), init[A_KEY].double()
    dense = sum(
        p * (B @ r.payload[latent_key("m.q_proj")].double() @ A) for p, r in zip(weights(replies), replies)
    )
    exported = strategy.evaluation_state()
    assert set(exported) == {A_KEY, B_KEY}  # a plain LoRA state: (A, B R)
    assert_rel_close(exported[B_KEY].double() @ exported[A_KEY].double(), dense, 1e-6)
    assert torch.equal(strategy.global_state[B_KEY], init[B_KEY]) and torch.equal(
        strategy.global_state[A_KEY], init[A_KEY]
    )


def test_fed_sb_starts_from_the_svd_of_the_pretrained_weights() -> None:
    from fedlora.adapters import LoraAdapters
    from fedlora.config.schema import AdapterConfig, ModelConfig
    from fedlora.strategies.fed_sb import FedSB, latent_key

    bundle = load_base_model(ModelConfig(name="tiny-llama"))
    adapters = LoraAdapters(
        bundle.model, AdapterConfig(rank=4, target_modules=["q_proj", "v_proj"]), "causal-lm"
    )
    state = FedSB().initial_adapter(adapters, RankProfile.uniform(4))
    for module, W in adapters.base_weights().items():
        A, B = state[f"{module}.lora_A.weight"].double(), state[f"{module}.lora_B.weight"].double()
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        assert_rel_close(B.T @ B, torch.eye(4, dtype=torch.float64), 1e-6)  # orthonormal columns
        assert_rel_close(B @ A, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], 1e-6)  # the best rank-4 part of W0
        assert float(state[latent_key(module)].abs().max()) < 1e-4  # R_0 ~ 0: the model starts at ~W0


def test_fed_sb_runs_uploads_only_the_cores_resumes_exactly_and_exports_plain_peft(tmp_path: Path) -> None:
    base = {"strategy.name": "fed-sb", "federation.clients_per_round": 3, "federation.rounds": 3}
    straight = run_and_resume_exactly(tmp_path, base)
    records = rounds(straight)
    assert all(r["status"] == "aggregated" for r in records)
    cfg = load_config(None, tiny_overrides(tmp_path, **base))
    # tiny-llama: 2 layers x (q_proj, v_proj), r = 4: each client sends 4 cores of 4 x 4 float32
    per_client = records[0]["bytes_up"] / 3
    assert per_client < 4 * 4 * 4 * 4 + 2048  # r^2 numbers per module, plus the safetensors header
    from fedlora.adapters import LoraAdapters
    from fedlora.engine.checkpoint import latest_checkpoint
    from fedlora.strategies.fed_sb import latents, merged_adapter

    server = latest_checkpoint(straight / "checkpoints").tensors
    assert all(float(R.abs().max()) > 1e-3 for R in latents(server).values())  # the cores left R_0 ~ 0
    ours_adapters = LoraAdapters(load_base_model(cfg.model).model, cfg.adapter, "causal-lm")
    ours_adapters.load(merged_adapter(server))
    plain = PeftModel.from_pretrained(load_base_model(cfg.model).model, str(straight / "global")).eval()
    ids = torch.tensor([[1, 5, 9, 13, 70, 200]])
    with torch.no_grad():
        theirs = plain(input_ids=ids).logits
        ours = ours_adapters.model(input_ids=ids).logits
        with plain.disable_adapter():
            untouched = plain(input_ids=ids).logits
    assert_rel_close(ours, theirs, 1e-5)
    assert relative_error(theirs, untouched) > 1e-5  # the trained cores change the model


def test_fed_sb_under_dp_noises_the_cores(tmp_path: Path) -> None:
    extra = {"strategy.name": "fed-sb", "privacy.enabled": "true", "privacy.noise_multiplier": 0.8}
    run_dir = run_experiment(
        load_config(None, tiny_overrides(tmp_path, **extra)), tmp_path / "dp", show_progress=False
    )
    records = rounds(run_dir)
    assert all(r["status"] == "aggregated" for r in records) and "epsilon" in json.dumps(records[-1])
