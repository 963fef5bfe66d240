"""SFT options of local training: learning-rate schedules with warmup, a decay across rounds, gradient
accumulation, ``max_grad_norm`` as the other name of ``grad_clip``, and the refusals where they cannot apply."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import assert_rel_close, tiny_overrides
from fedlora import load_config
from fedlora.client.settings import LocalTrainingSettings, round_settings
from fedlora.client.steps import make_scheduler, run_steps
from fedlora.config.loader import ConfigError
from fedlora.data.encoding import Encoder, collate
from fedlora.runner import run


def test_max_grad_norm_is_grad_clip() -> None:
    assert load_config(None, ["client.max_grad_norm=0.25"]).client.grad_clip == 0.25


@pytest.mark.parametrize(
    ("name", "warmup"), [("linear", {"warmup_ratio": 0.25}), ("cosine", {"warmup_steps": 3})]
)
def test_schedules_follow_their_formula_over_the_rounds_steps(name: str, warmup: dict) -> None:
    steps, lr = 8, 0.1
    settings = LocalTrainingSettings(optimizer="sgd", lr=lr, lr_scheduler=name, **warmup)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(optimizer, settings, steps)
    w = warmup.get("warmup_steps") or math.ceil(warmup["warmup_ratio"] * steps)
    for t in range(steps):
        if t < w:
            expected = lr * t / w
        else:
            progress = (t - w) / (steps - w)
            expected = lr * ((1 - progress) if name == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        optimizer.step()
        scheduler.step()
    assert make_scheduler(optimizer, replace(settings, lr_scheduler="constant"), steps) is None


def test_lr_decay_across_rounds() -> None:
    settings = LocalTrainingSettings(optimizer="adamw", lr=1e-3, lr_scale=2.0, lr_decay=0.5)
    assert round_settings(settings, 1).lr == pytest.approx(2e-3)
    assert round_settings(settings, 3).lr == pytest.approx(2e-3 * 0.25)


def test_cosine_annealing_across_rounds_is_flowertunes() -> None:
    """``client.lr_min``: FlowerTune's cosine_annealing(current_round, num_rounds, lr_max, lr_min), with
    rounds counted from 1 (the last round trains at lr_min)."""
    from fedlora.client.node import resolve_settings
    from fedlora.config.schema import ClientConfig

    def flowertune(current_round: int, total_round: int, lrate_max: float, lrate_min: float) -> float:
        cos_inner = math.pi * current_round / total_round
        return lrate_min + 0.5 * (lrate_max - lrate_min) * (1 + math.cos(cos_inner))

    settings = resolve_settings(ClientConfig(lr=5e-5, lr_min=1e-6, optimizer="adamw"), {}, total_rounds=10)
    lrs = [round_settings(settings, t).lr for t in range(1, 11)]
    assert lrs == pytest.approx([flowertune(t, 10, 5e-5, 1e-6) for t in range(1, 11)], rel=1e-12)
    assert lrs[-1] == pytest.approx(1e-6) and all(a > b for a, b in zip(lrs, lrs[1:]))
    scaled = replace(settings, lr_scale=2.0)
    assert round_settings(scaled, 3).lr == pytest.approx(2 * flowertune(3, 10, 5e-5, 1e-6))
    with pytest.raises(ValueError, match="lr_min .* or lr_decay"):
        ClientConfig(lr_min=1e-6, lr_decay=0.9)
    with pytest.raises(ValueError, match="must not exceed lr"):
        ClientConfig(lr=1e-4, lr_min=1e-3)


def test_gradient_accumulation_is_one_step_on_the_mean_of_the_micro_batch_losses() -> None:
    from fedlora.adapters.lora import LoraAdapters
    from fedlora.client.loss import batch_loss
    from fedlora.config.schema import AdapterConfig, ModelConfig
    from fedlora.data.examples import Example
    from fedlora.models.loading import load_base_model

    bundle = load_base_model(ModelConfig(name="tiny-llama"))
    adapters = LoraAdapters(bundle.model, AdapterConfig(rank=4, dropout=0.0), "causal-lm")
    adapters.activate(4)
    model = adapters.model
    encoder = Encoder(bundle.tokenizer, "causal-lm", 64, "alpaca", False)
    examples = [Example(instruction=f"add {i} and {i + 1}", output=str(2 * i + 1)) for i in range(4)]
    micro = [[encoder.encode(e) for e in examples[:2]], [encoder.encode(e) for e in examples[2:]]]
    params = [p for _, p in adapters.trainable_parameters()]
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():  # a non-zero B, so both factors get gradients
        for key, p in adapters.trainable_parameters():
            if ".lora_B." in key:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    start = adapters.state()
    pad = bundle.tokenizer.pad_token_id
    loss_of = lambda batch: batch_loss(model, batch, "causal-lm")  # noqa: E731
    optimizer = torch.optim.SGD(params, lr=0.5)
    run_steps(model, params, micro, optimizer, loss_of, None, 0, encoder.training_batch, accumulation=2)
    accumulated = adapters.state()
    adapters.load(start)
    model.train()
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for items in micro:  # the direct computation: mean of the two micro-batches' gradients, one SGD step
        model.zero_grad()
        batch_loss(model, collate(items, pad), "causal-lm").backward()
        for g, p in zip(grads, params):
            g += p.grad.double() / 2
    model.eval()
    expected = {k: start[k].double() - 0.5 * g for (k, _), g in zip(adapters.trainable_parameters(), grads)}
    for key, value in expected.items():
        assert_rel_close(accumulated[key].double(), value, 1e-5)
    assert any(not torch.equal(accumulated[k], start[k]) for k in start)


def test_refusals_where_the_options_cannot_apply(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="client.gradient_accumulation_steps.*fedmezo"):
        load_config(
            None,
            tiny_overrides(tmp_path, **{"strategy.name": "fedmezo", "client.gradient_accumulation_steps": 2}),
        )
    with pytest.raises(ConfigError, match="client.lr_scheduler.*fedmezo"):
        load_config(
            None, tiny_overrides(tmp_path, **{"strategy.name": "fedmezo", "client.lr_scheduler": "cosine"})
        )
    dp = {"privacy.enabled": "true", "privacy.noise_multiplier": 1.0, "client.gradient_accumulation_steps": 2}
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be 1 with privacy"):
        load_config(None, tiny_overrides(tmp_path, **dp))
    with pytest.raises(ConfigError, match="warmup_steps or warmup_ratio"):
        load_config(None, ["client.warmup_steps=2", "client.warmup_ratio=0.1"])


def test_runs_with_a_schedule_and_decay_and_batched_clients_follow_the_same_schedule(tmp_path: Path) -> None:
    sft = {
        "client.lr_scheduler": "cosine",
        "client.warmup_steps": 1,
        "client.lr_decay": 0.5,
        "client.local_steps": 3,
        "adapter.dropout": 0.0,
        "federation.clients_per_round": 3,
    }
    per = run(load_config(None, tiny_overrides(tmp_path, **sft)), tmp_path / "per", show_progress=False)
    batched_cfg = load_config(None, tiny_overrides(tmp_path, **sft, **{"compute.batch_clients": "true"}))
    batched = run(batched_cfg, tmp_path / "batched", show_progress=False)
    for key in per.final_state:
        assert_rel_close(batched.final_state[key], per.final_state[key], 1e-4)
    plain = run(
        load_config(None, tiny_overrides(tmp_path, **{**sft, "client.lr_scheduler": "constant"})),
        tmp_path / "plain",
        show_progress=False,
    )
    assert any(not torch.equal(plain.final_state[k], per.final_state[k]) for k in per.final_state)
    accum = {**sft, "client.gradient_accumulation_steps": 2}
    result = run(
        load_config(None, tiny_overrides(tmp_path, **accum)), tmp_path / "accum", show_progress=False
    )
    assert all(
        c["steps"] == 3 for r in result.records for c in r["clients"]
    )  # optimizer steps, not micro-batches


def test_batched_clients_fall_back_under_gradient_accumulation(tmp_path: Path) -> None:
    accum = {"client.gradient_accumulation_steps": 2, "client.local_steps": 2, "adapter.dropout": 0.0}
    per = run(load_config(None, tiny_overrides(tmp_path, **accum)), tmp_path / "per", show_progress=False)
    together = {**accum, "compute.batch_clients": "true"}
    batched = run(
        load_config(None, tiny_overrides(tmp_path, **together)), tmp_path / "b", show_progress=False
    )
    assert all(torch.equal(batched.final_state[k], per.final_state[k]) for k in per.final_state)


def test_each_step_reports_its_gradient_norm_before_clipping(tmp_path: Path) -> None:
    """One plain SGD step from B = 0 moves only B (A's gradient s B^T (dL/dh) x^T is 0) by -lr g, so the
    reported pre-clipping norm is ||B after|| / lr; under a clip below it the reported norm is the same and the
    step shrinks to lr x clip; batched clients report each client's own norms, as the per-client path does."""
    lr = 1e-2
    one_step = {
        "client.optimizer": "sgd",
        "client.lr": lr,
        "client.local_steps": 1,
        "client.grad_clip": "null",
        "federation.rounds": 1,
        "federation.clients_per_round": 1,
        "adapter.dropout": 0.0,
    }

    def b_norm(state: dict[str, torch.Tensor]) -> float:
        return math.sqrt(sum(float(v.double().pow(2).sum()) for k, v in state.items() if "lora_B" in k))

    free = run(
        load_config(None, tiny_overrides(tmp_path, **one_step)), tmp_path / "free", show_progress=False
    )
    (client,) = free.records[0]["clients"]
    assert client["grad_norm"] == pytest.approx(b_norm(free.final_state) / lr, rel=1e-4)
    assert client["grad_norm_max"] == client["grad_norm"]
    clip = client["grad_norm"] / 4
    clipped_cfg = load_config(None, tiny_overrides(tmp_path, **{**one_step, "client.grad_clip": clip}))
    clipped = run(clipped_cfg, tmp_path / "clipped", show_progress=False)
    assert clipped.records[0]["clients"][0]["grad_norm"] == pytest.approx(client["grad_norm"], rel=1e-5)
    assert b_norm(clipped.final_state) / lr == pytest.approx(clip, rel=1e-4)

    two = {**one_step, "federation.clients_per_round": 2, "client.local_steps": 2, "client.grad_clip": 0.5}
    per = run(load_config(None, tiny_overrides(tmp_path, **two)), tmp_path / "per", show_progress=False)
    together = {**two, "compute.batch_clients": "true"}
    batched = run(
        load_config(None, tiny_overrides(tmp_path, **together)), tmp_path / "b", show_progress=False
    )
    norms = {c["client"]: (c["grad_norm"], c["grad_norm_max"]) for c in per.records[0]["clients"]}
    for c in batched.records[0]["clients"]:
        assert c["batched_clients"] == 2
        assert c["grad_norm"] == pytest.approx(norms[c["client"]][0], rel=1e-4)
        assert c["grad_norm_max"] == pytest.approx(norms[c["client"]][1], rel=1e-4)


def test_dora_trains_with_fedit_and_methods_that_read_ab_pairs_refuse_it(tmp_path: Path) -> None:
    """``adapter.use_dora``: FedIT averages the magnitude vectors with A and B (they move in training);
    a method whose rule reads A/B pairs (FlexLoRA's SVD) refuses it, naming the field."""
    cfg = load_config(None, tiny_overrides(tmp_path, **{"adapter.use_dora": "true", "federation.rounds": 1}))
    result = run(cfg, tmp_path / "dora", show_progress=False)
    magnitudes = [k for k in result.final_state if "lora_magnitude_vector" in k]
    assert magnitudes
    from fedlora.adapters.lora import LoraAdapters
    from fedlora.models.loading import load_base_model

    initial = LoraAdapters(load_base_model(cfg.model).model, cfg.adapter, "causal-lm").initial_state()
    assert any(not torch.equal(initial[k], result.final_state[k]) for k in magnitudes)
    with pytest.raises(ConfigError, match="adapter.use_dora.*flexlora"):
        load_config(
            None, tiny_overrides(tmp_path, **{"adapter.use_dora": "true", "strategy.name": "flexlora"})
        )


def test_the_optimizers_trl_users_name() -> None:
    """adamw_torch_fused is AdamW's update; the 8-bit AdamW (bitsandbytes) is close to it; unknown names
    are refused with the list."""
    from fedlora.client.steps import make_optimizer

    torch.manual_seed(0)
    start = torch.randn(64, 128, dtype=torch.float32)
    grads = [torch.randn_like(start) for _ in range(3)]

    def after(name: str) -> torch.Tensor:
        param = torch.nn.Parameter(start.clone())
        optimizer = make_optimizer([param], LocalTrainingSettings(optimizer=name, lr=1e-2, weight_decay=0.01))
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        return param.detach()

    reference = after("adamw")
    moved = reference - start
    assert_rel_close(after("adamw_torch_fused"), reference, 1e-5)
    assert torch.equal(after("adamw_torch"), reference)
    pytest.importorskip("bitsandbytes")
    for name in ("adamw_8bit", "paged_adamw_8bit"):
        step = after(name) - start
        assert (step - moved).norm() / moved.norm() < 0.05, name  # 8-bit state: close, not equal
    with pytest.raises(ValueError, match="allowed: adamw, adamw_torch"):
        make_optimizer([torch.nn.Parameter(start)], LocalTrainingSettings(optimizer="lion", lr=1e-3))
