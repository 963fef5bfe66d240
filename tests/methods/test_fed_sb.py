"""Fed-SB: the r x r cores averaged exactly, the SVD start, only the cores travel, plain-PEFT export, DP."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from method_helpers import (
    A_KEY,
    B_KEY,
    D,
    K,
    R,
    assert_noise_reaches_only,
    dp_replies,
    rounds,
    run_and_resume_exactly,
    weights,
)
from peft import PeftModel

from conftest import assert_rel_close, relative_error, tiny_overrides
from fedlora import load_config
from fedlora.adapters.ranks import RankProfile
from fedlora.engine.server import Server
from fedlora.models.loading import load_base_model
from fedlora.runner import run_experiment
from fedlora.strategies.base import ClientReply, ServerSetup


# --- Fed-SB ---------------------------------------------------------------------------------------------
def test_fed_sb_averages_the_cores_exactly_and_exports_b_times_r() -> None:
    from fedlora.strategies.fed_sb import FedSB, FedSBOptions, latent_key

    gen = torch.Generator().manual_seed(9)
    strategy = FedSB()
    init = {
        A_KEY: torch.randn(R, K, generator=gen),
        B_KEY: torch.linalg.qr(torch.randn(D, R, generator=gen))[0],
        latent_key("m.q_proj"): torch.zeros(R, R),
    }
    server = Server(
        strategy, ServerSetup(init, {i: RankProfile.uniform(R) for i in range(3)}, lora_alpha=8.0)
    )
    instruction = server.configure(1, [0])[0]
    replies = [
        ClientReply(i, {latent_key("m.q_proj"): torch.randn(R, R, generator=gen)}, n)
        for i, n in enumerate((2, 5, 9))
    ]
    assert all(server.validate_reply(instruction, r) is None for r in replies)
    with_factors = ClientReply(0, {**replies[0].payload, B_KEY: init[B_KEY]}, 2)
    assert "unexpected" in (server.validate_reply(instruction, with_factors) or "")  # B is frozen, unsent
    server.aggregate(1, replies)
    B, A = init[B_KEY].double(), init[A_KEY].double()
    # the reference's rule (aggregate_models_fed_sb: torch.stack(...).mean(0)): R = (1/K) sum R_i
    dense = sum(B @ r.payload[latent_key("m.q_proj")].double() @ A for r in replies) / len(replies)
    exported = server.evaluation_state()
    assert set(exported) == {A_KEY, B_KEY}  # a plain LoRA state: (A, B R)
    assert_rel_close(exported[B_KEY].double() @ exported[A_KEY].double(), dense, 1e-6)
    # weighting: examples, p_i = n_i / sum n_j
    weighted = Server(
        FedSB(FedSBOptions(weighting="examples")),
        ServerSetup(init, {i: RankProfile.uniform(R) for i in range(3)}, lora_alpha=8.0),
    )
    weighted.aggregate(1, replies)
    by_examples = sum(
        p * (B @ r.payload[latent_key("m.q_proj")].double() @ A) for p, r in zip(weights(replies), replies)
    )
    got = weighted.evaluation_state()
    assert_rel_close(got[B_KEY].double() @ got[A_KEY].double(), by_examples, 1e-6)
    assert relative_error(by_examples, dense) > 1e-2  # the two rules are told apart
    assert torch.equal(server.global_state[B_KEY], init[B_KEY]) and torch.equal(
        server.global_state[A_KEY], init[A_KEY]
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
    from fedlora.engine.server import state_from_checkpoint
    from fedlora.strategies.fed_sb import latents, merged_adapter

    checkpoint = latest_checkpoint(straight / "checkpoints")
    assert checkpoint is not None
    server = state_from_checkpoint(checkpoint.tensors, checkpoint.meta).adapter
    assert all(float(R.abs().max()) > 1e-3 for R in latents(server).values())  # the cores left R_0 ~ 0
    from fedlora.engine.node_spec import effective_adapter

    # the federation trained at the reference scale s = 1, and the exported PEFT config says so
    assert json.loads((straight / "global" / "adapter_config.json").read_text())["lora_alpha"] == 4
    ours_adapters = LoraAdapters(load_base_model(cfg.model).model, effective_adapter(cfg), "causal-lm")
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
    # the noise lands on the r x r cores, and nothing else moves: A and B keep the payload's values
    from fedlora.strategies.fed_sb import latents

    payload, noisy, held, plain = dp_replies(tmp_path / "pair", extra)
    assert_noise_reaches_only(set(latents(payload)), payload, noisy, held, plain)


def test_fed_sb_and_flora_train_at_their_reference_lora_scale(tmp_path: Path) -> None:
    """Fed-SB's scripts set lora_alpha = r (s = 1), FLoRA's give a client of rank r_i lora_alpha = 2 r_i (s = 2):
    the federation's adapter section is that, for the server and every node; ``scale: adapter`` or an explicit
    ``adapter.scale`` keeps the config's."""
    from fedlora.engine.node_spec import NodeSpec, effective_adapter
    from fedlora.runner import build_simulation

    def adapter_of(**extra: object):
        return effective_adapter(load_config(None, tiny_overrides(tmp_path, **extra)))

    assert adapter_of(**{"strategy.name": "fed-sb"}).scale == 1.0
    assert adapter_of(**{"strategy.name": "flora"}).scale == 2.0
    assert adapter_of(**{"strategy.name": "flora", "strategy.options": "{scale: adapter}"}).scale is None
    assert adapter_of(**{"strategy.name": "fed-sb", "adapter.scale": 0.5}).scale == 0.5
    assert adapter_of(**{"strategy.name": "fedit"}).scale is None
    cfg = load_config(None, tiny_overrides(tmp_path, **{"strategy.name": "fed-sb", "adapter.alpha": 16}))
    assert NodeSpec.of(cfg).adapter.scale == 1.0
    sim, _ = build_simulation(cfg)
    assert sim.adapters.scaling(4) == 1.0 and sim.strategy.setup.scaling(4) == 1.0  # not 16 / 4
