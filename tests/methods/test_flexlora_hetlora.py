"""FlexLoRA and HetLoRA aggregation against direct dense computations; rank profiles; the alpha/r (and rsLoRA's
alpha/sqrt(r)) convention."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_rel_close
from fedlora.adapters.ranks import (
    LoraScaling,
    RankProfile,
    assign_profiles,
    client_profiles,
    counts_from_shares,
    module_kind,
    profile_of_state,
    trailing_rank_norms,
    truncate_state,
)
from fedlora.config.schema import ResourcesConfig
from fedlora.engine.server import Server
from fedlora.strategies.base import ClientReply, ServerSetup
from fedlora.strategies.flexlora import FlexLoRA, FlexLoRAOptions
from fedlora.strategies.hetlora import HetLoRA, HetLoRAOptions

ALPHA = 16.0
LORA, RSLORA = LoraScaling(ALPHA), LoraScaling(ALPHA, rank_stabilized=True)
# module path -> (d, k): one attention and one MLP module, PEFT-style keys
MODULES = {
    "base_model.model.model.layers.0.self_attn.q_proj": (24, 24),
    "base_model.model.model.layers.0.mlp.up_proj": (40, 24),
}


def state_at(profile: RankProfile, gen: torch.Generator, zero_b: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for path, (d, k) in MODULES.items():
        r = profile.rank_for(path)
        out[f"{path}.lora_A.weight"] = torch.randn(r, k, generator=gen)
        out[f"{path}.lora_B.weight"] = torch.zeros(d, r) if zero_b else torch.randn(d, r, generator=gen)
    return out


def delta(state: dict[str, torch.Tensor], path: str, scaling: LoraScaling = LORA) -> np.ndarray:
    """s_r B A in float64, with s_r written out: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    A = state[f"{path}.lora_A.weight"].double().numpy()
    B = state[f"{path}.lora_B.weight"].double().numpy()
    r = A.shape[0]
    return (ALPHA / np.sqrt(r) if scaling.rank_stabilized else ALPHA / r) * B @ A


def best_rank(M: np.ndarray, r: int) -> np.ndarray:
    U, S, Vh = np.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


PROFILES = [RankProfile(2, 2), RankProfile(4, 4), RankProfile(4, 12), RankProfile(8, 12)]


def started(strategy, profiles: list[RankProfile], gen: torch.Generator, scaling: LoraScaling = LORA):
    rmax = RankProfile(max(p.attention for p in profiles), max(p.mlp for p in profiles))
    server = Server(
        strategy,
        ServerSetup(
            state_at(rmax, gen, zero_b=True),
            dict(enumerate(profiles)),
            ALPHA,
            seed=3,
            rank_stabilized=scaling.rank_stabilized,
            lora_scale=scaling.constant,
        ),
    )
    return server


@pytest.mark.parametrize("scaling", [LORA, RSLORA], ids=["lora", "rslora"])
@pytest.mark.parametrize("split", ["b", "sqrt"])
def test_flexlora_gives_each_client_the_best_rank_r_approximation_of_the_weighted_sum(
    split: str, scaling: LoraScaling
) -> None:
    gen = torch.Generator().manual_seed(0)
    server = started(FlexLoRA(FlexLoRAOptions(factor_split=split)), PROFILES, gen, scaling)
    sizes = [5, 1, 3, 7]
    replies = [ClientReply(i, state_at(p, gen), n) for i, (p, n) in enumerate(zip(PROFILES, sizes))]
    server.aggregate(1, replies)
    payloads = server.configure(2, [0, 1, 2, 3])
    for path in MODULES:
        dense = sum(n / sum(sizes) * delta(r.payload, path, scaling) for r, n in zip(replies, sizes))
        for cid, profile in enumerate(PROFILES):
            got = delta(payloads[cid].payload, path, scaling)
            assert_rel_close(got, best_rank(dense, profile.rank_for(path)), 1e-5)
        # the global (evaluation/export) adapter is the rank-r_max truncation
        r_max = max(p.rank_for(path) for p in PROFILES)
        assert_rel_close(delta(server.global_state, path, scaling), best_rank(dense, r_max), 1e-5)
    assert {profile_of_state(payloads[c].payload) for c in range(4)} == set(PROFILES)


def test_clients_of_one_profile_share_one_payload_object() -> None:
    """Serialised once for the byte counts: clients 2 and 4 have one profile, client 3 another."""
    gen = torch.Generator().manual_seed(9)
    profiles = [*PROFILES, PROFILES[2]]
    server = started(FlexLoRA(), profiles, gen)
    payloads = server.configure(1, [0, 1, 2, 3, 4])
    assert payloads[2].payload is payloads[4].payload
    assert payloads[2].payload is not payloads[3].payload
    assert len({id(i.payload) for i in payloads.values()}) == len(set(profiles))


def test_flexlora_round_1_is_the_initial_adapter_truncated() -> None:
    gen = torch.Generator().manual_seed(1)
    server = started(FlexLoRA(), PROFILES, gen)
    payload = server.configure(1, [0])[0].payload
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    assert torch.equal(payload[key], server.global_state[key][:2])


def test_flexlora_completes_a_at_large_ranks_when_the_round_was_small() -> None:
    """Only rank-2 clients replied: Delta has rank <= 4 but a rank-12 client must still get 12 usable rows."""
    gen = torch.Generator().manual_seed(2)
    server = started(FlexLoRA(), PROFILES, gen)
    replies = [ClientReply(i, state_at(PROFILES[0], gen), 4) for i in (0, 1)]
    server.aggregate(1, replies)
    big = server.configure(2, [3])[3].payload
    path = "base_model.model.model.layers.0.mlp.up_proj"
    A = big[f"{path}.lora_A.weight"].double()
    torch.testing.assert_close(A @ A.T, torch.eye(12, dtype=torch.float64), atol=1e-5, rtol=0)
    dense = sum(0.5 * delta(r.payload, path) for r in replies)
    assert_rel_close(delta(big, path), dense, 1e-5)


@pytest.mark.parametrize("scaling", [LORA, RSLORA], ids=["lora", "rslora"])
def test_hetlora_matches_zero_padding_rule_by_hand(scaling: LoraScaling) -> None:
    gen = torch.Generator().manual_seed(4)
    server = started(HetLoRA(), PROFILES, gen, scaling)
    old = {k: v.clone() for k, v in server.global_state.items()}
    chosen = [0, 2]  # ranks (2,2) and (4,12); the rank-8 attention positions 4..7 stay as they were
    replies = [ClientReply(i, state_at(PROFILES[i], gen), 3) for i in chosen]
    out = server.aggregate(1, replies)
    for path, (d, k) in MODULES.items():
        r_max = max(p.rank_for(path) for p in PROFILES)
        norms = [np.linalg.norm(delta(r.payload, path, scaling)) for r in replies]
        w = [n / sum(norms) for n in norms]
        A = np.zeros((r_max, k))
        B = np.zeros((d, r_max))
        for wi, reply in zip(w, replies):
            a = reply.payload[f"{path}.lora_A.weight"].double().numpy()
            b = reply.payload[f"{path}.lora_B.weight"].double().numpy()
            r = a.shape[0]
            A[:r] += wi * a
            # B expressed at r_max's scaling: s_r / s_rmax = r_max / r, or sqrt(r_max / r) for rsLoRA
            B[:, :r] += wi * b * (np.sqrt(r_max / r) if scaling.rank_stabilized else r_max / r)
        covered = max(PROFILES[i].rank_for(path) for i in chosen)
        A[covered:] = old[f"{path}.lora_A.weight"][covered:].double().numpy()
        B[:, covered:] = old[f"{path}.lora_B.weight"][:, covered:].double().numpy()
        assert_rel_close(out[f"{path}.lora_A.weight"], A, 1e-6)
        assert_rel_close(out[f"{path}.lora_B.weight"], B, 1e-6)


def test_padding_then_truncation_keeps_a_lone_clients_update() -> None:
    """One client at rank 4 in a federation with r_max 8: its update comes back unchanged at rank 4."""
    gen = torch.Generator().manual_seed(5)
    server = started(HetLoRA(), PROFILES, gen)
    reply = ClientReply(1, state_at(PROFILES[1], gen), 3)
    server.aggregate(1, [reply])
    back = server.configure(2, [1])[1].payload
    for path in MODULES:
        assert_rel_close(delta(back, path), delta(reply.payload, path), 1e-6)


@pytest.mark.parametrize("scaling", [LORA, RSLORA], ids=["lora", "rslora"])
def test_truncation_rescales_b_so_the_update_is_the_leading_part(scaling: LoraScaling) -> None:
    gen = torch.Generator().manual_seed(6)
    full = state_at(RankProfile(8, 8), gen)
    small = truncate_state(full, RankProfile(3, 5), scaling)
    for path in MODULES:
        r = RankProfile(3, 5).rank_for(path)
        A = full[f"{path}.lora_A.weight"].double()
        B = full[f"{path}.lora_B.weight"].double()
        lead = (B[:, :r] @ A[:r]).numpy() * (ALPHA / np.sqrt(8) if scaling.rank_stabilized else ALPHA / 8)
        assert_rel_close(delta(small, path, scaling), lead, 1e-6)


def test_wrong_rank_reply_is_rejected_and_hetlora_accepts_only_the_pruned_rank() -> None:
    gen = torch.Generator().manual_seed(7)
    server = started(
        HetLoRA(HetLoRAOptions(prune_rule="threshold", prune_threshold=1.0, prune_gamma=0.5)), PROFILES, gen
    )
    instruction = server.configure(1, [3])[3]
    wrong = ClientReply(3, state_at(RankProfile(8, 8), gen), 4)
    assert "rank 8, but the client was given rank 12" in server.validate_reply(instruction, wrong)
    pruned = ClientReply(3, state_at(RankProfile(4, 6), gen), 4)
    assert server.validate_reply(instruction, pruned) is None
    server.aggregate(1, [pruned])
    assert server.client_profiles[3] == RankProfile(4, 6)
    resumed = started(HetLoRA(), PROFILES, gen)
    resumed.restore(*server.checkpoint())  # the pruned profiles are state: a resume keeps them
    assert resumed.client_profiles == server.client_profiles != dict(enumerate(PROFILES))
    flex = started(FlexLoRA(), PROFILES, gen)
    assert "given rank" in flex.validate_reply(flex.configure(1, [3])[3], pruned)


def test_trailing_rank_penalty_has_a_gradient() -> None:
    gen = torch.Generator().manual_seed(8)
    named = [(k, v.clone().requires_grad_(True)) for k, v in state_at(RankProfile(8, 8), gen).items()]
    trailing_rank_norms(named, gamma=0.5).sum().backward()
    for key, tensor in named:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
        zone = tensor.grad[4:] if "lora_A" in key else tensor.grad[:, 4:]
        lead = tensor.grad[:4] if "lora_A" in key else tensor.grad[:, :4]
        assert zone.abs().sum() > 0 and lead.abs().sum() == 0


def test_named_distributions_and_seeded_assignment() -> None:
    assert counts_from_shares([0.8, 0.05, 0.05, 0.1], 20) == [16, 1, 1, 2]
    assert sum(counts_from_shares([0.0575, 0.4425, 0.4425, 0.0575], 7)) == 7
    types = [RankProfile(1, 1), RankProfile(2, 2)]
    a = assign_profiles(10, types, [0.5, 0.5], seed=1)
    assert a == assign_profiles(10, types, [0.5, 0.5], seed=1) and a.count(types[0]) == 5
    cfg = ResourcesConfig(distribution="heavy-tail-strong", rank_scale=0.1)
    profiles = client_profiles(cfg, 4, 20, seed=0)
    assert profiles.count(RankProfile(20, 20)) == 16 and RankProfile(3, 20) in profiles
    forced = client_profiles(ResourcesConfig(distribution="uniform", force="min", rank_scale=0.1), 4, 8, 0)
    assert set(forced) == {RankProfile(1, 1)}
    assert client_profiles(ResourcesConfig(), 6, 3, 0) == [RankProfile(6, 6)] * 3
    assert module_kind("bert.encoder.layer.0.attention.output.dense") == "attention"
    assert module_kind("bert.encoder.layer.0.output.dense") == "mlp"


def test_fedit_refuses_heterogeneous_ranks() -> None:
    from fedlora.config.loader import ConfigError
    from fedlora.strategies.fedavg import FedIT

    gen = torch.Generator().manual_seed(9)
    with pytest.raises(ConfigError, match="flexlora, hetlora or flora, or set resources.force"):
        started(FedIT(), PROFILES, gen)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_alpha_over_r_is_consistent_between_server_and_clients(tmp_path: Path, use_rslora: bool) -> None:
    """A PEFT client at rank r computes W0 x + s_r B_r A_r x equal to the server's truncated update
    (s_r = alpha / r, or alpha / sqrt(r) under rsLoRA, PEFT's own layer scaling in both cases)."""
    from transformers import AutoModelForCausalLM

    from fedlora.adapters.lora import LoraAdapters
    from fedlora.config.schema import AdapterConfig, ModelConfig
    from fedlora.models.loading import load_base_model

    bundle = load_base_model(ModelConfig(name="tiny-llama"))
    adapters = LoraAdapters(
        bundle.model,
        AdapterConfig(rank=8, alpha=ALPHA, dropout=0.0, target_modules="all-linear", use_rslora=use_rslora),
        "causal-lm",
    )
    gen = torch.Generator().manual_seed(10)
    full = {
        k: torch.randn(v.shape, generator=gen) * 0.05
        for k, v in adapters.initial_state(RankProfile(8, 16)).items()
    }
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    for profile in (RankProfile(8, 16), RankProfile(2, 5)):
        small = truncate_state(full, profile, RSLORA if use_rslora else LORA)
        adapters.load(small)
        with torch.no_grad():
            ours = adapters.model(input_ids=ids).logits
            # merge the server-side update s_rmax * B[:, :r] A[:r] by hand into a fresh base model
            plain = AutoModelForCausalLM.from_pretrained(bundle.folder)
            modules = dict(plain.named_modules())
            for key in full:
                if ".lora_A." not in key:
                    continue
                path = key.split(".lora_A.", 1)[0]
                r_full = full[key].shape[0]
                r = profile.rank_for(path)
                s_full = ALPHA / r_full**0.5 if use_rslora else ALPHA / r_full
                lead = s_full * full[key.replace("lora_A", "lora_B")][:, :r] @ full[key][:r]
                modules[path.removeprefix("base_model.model.")].weight += lead
            merged = plain(input_ids=ids).logits
        assert_rel_close(ours, merged, 1e-5)


def test_named_distributions_follow_the_released_flexlora_code() -> None:
    """The released code's client types (r8, r200, a30-m200, r30) and draws: heavy_tail 80% r8, 10% r200,
    5% a30-m200, 5% r30; heavy_tail_strong 80% r200, 10% a30-m200, 5% r30, 5% r8; normal a N(1.5, 0.7)
    pdf at positions [0, 3, 2, 1], each position the index of the type drawn."""
    from math import exp

    from fedlora.adapters.ranks import NAMED_DISTRIBUTIONS, PAPER_RANK_TYPES

    order = [p.name for p in PAPER_RANK_TYPES]
    assert order == ["r8", "r30", "a30-m200", "r200"]

    def shares(by_name: dict[str, float]) -> tuple[float, ...]:
        return tuple(by_name[n] for n in order)

    assert NAMED_DISTRIBUTIONS["heavy-tail-light"] == shares(
        {"r8": 0.80, "r200": 0.10, "a30-m200": 0.05, "r30": 0.05}
    )
    assert NAMED_DISTRIBUTIONS["heavy-tail-strong"] == shares(
        {"r200": 0.80, "a30-m200": 0.10, "r30": 0.05, "r8": 0.05}
    )
    # np.random.choice(positions, p=pdf(positions)) picks Type_<position>: type i has probability pdf(i)
    code_types = ["r8", "r200", "a30-m200", "r30"]  # Type_0 .. Type_3
    pdf = {t: exp(-((i - 1.5) ** 2) / (2 * 0.7**2)) for i, t in enumerate(code_types)}
    total = sum(pdf.values())
    expected = shares({t: v / total for t, v in pdf.items()})
    assert all(abs(a - b) < 5e-4 for a, b in zip(NAMED_DISTRIBUTIONS["normal"], expected))


def test_hetlora_is_the_papers_zero_padding_rule_when_the_scale_is_one_number() -> None:
    """With one LoRA scale at every rank (adapter.scale), HetLoRA's aggregation is the paper's rule literally:
    zero-pad every client to r_max and average A and B with w_i = ||B_i A_i||_F / sum_j ||B_j A_j||_F (no
    rescaling of B is needed); computed here from the paper's formula, not from fedlora's code."""
    gen = torch.Generator().manual_seed(14)
    constant = LoraScaling(ALPHA, constant=2.0)
    server = started(HetLoRA(), PROFILES, gen, constant)
    old = {k: v.clone() for k, v in server.global_state.items()}
    replies = [ClientReply(i, state_at(PROFILES[i], gen), 3 + i) for i in range(4)]
    out = server.aggregate(1, replies)
    for path, (d, k) in MODULES.items():
        r_max = max(p.rank_for(path) for p in PROFILES)
        factors = [
            (
                r.payload[f"{path}.lora_B.weight"].double().numpy(),
                r.payload[f"{path}.lora_A.weight"].double().numpy(),
            )
            for r in replies
        ]
        norms = [np.linalg.norm(b @ a) for b, a in factors]
        A, B = np.zeros((r_max, k)), np.zeros((d, r_max))
        for (b, a), n in zip(factors, norms, strict=True):
            A[: a.shape[0]] += n / sum(norms) * a
            B[:, : b.shape[1]] += n / sum(norms) * b
        assert_rel_close(out[f"{path}.lora_A.weight"], A, 1e-6)
        assert_rel_close(out[f"{path}.lora_B.weight"], B, 1e-6)
    assert old.keys() == out.keys()


def test_self_pruning_compares_the_trained_tail_with_the_received_one() -> None:
    """The paper's rule: a client prunes to floor(gamma r) when its trained adapter's tail ||B[:, g:]|| ||A[g:]||
    is smaller than that of the adapter it received; otherwise it replies at its rank."""
    from fedlora.adapters.lora import LoraAdapters
    from fedlora.config.schema import AdapterConfig, ModelConfig
    from fedlora.models.loading import load_base_model
    from fedlora.strategies.hetlora import SelfPruning

    adapters = LoraAdapters(
        load_base_model(ModelConfig(name="tiny-llama")).model,
        AdapterConfig(rank=4, target_modules=["q_proj"]),
        "causal-lm",
    )
    gen = torch.Generator().manual_seed(2)
    received = {k: torch.randn(v.shape, generator=gen) for k, v in adapters.initial_state().items()}
    hook = SelfPruning(gamma=0.5)

    class Ctx:
        scratch: dict = {}

    Ctx.adapters = adapters
    for shrink, prunes in ((0.5, True), (2.0, False)):
        adapters.load(received)
        Ctx.scratch = {}
        hook.before_training(Ctx)
        trained = {k: v.clone() for k, v in received.items()}
        for k in trained:  # scale the tail rows g: of A only: the leading part is the received one
            if ".lora_A." in k:
                trained[k][2:] *= shrink
        metrics: dict = {}
        reply = hook.reply_state(Ctx, trained, metrics)
        ranks = {v.shape[0] for k, v in reply.items() if ".lora_A." in k}
        assert ranks == ({2} if prunes else {4}), (shrink, metrics)
        assert metrics["trailing_rank_norm"] == pytest.approx(
            shrink * Ctx.scratch["received_trailing_norm"], rel=1e-5
        )
