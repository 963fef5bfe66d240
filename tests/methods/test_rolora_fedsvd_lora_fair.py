"""RoLoRA, FedSVD and LoRA-FAIR: server rules against a direct dense computation on random inputs, what travels,
and end-to-end runs (embedded, Flower simulation, resume, DP, plain-PEFT export; Fed-SB's run shares the
parametrised end-to-end test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from method_helpers import (
    A_KEY,
    B_KEY,
    D,
    K,
    R,
    assert_noise_reaches_only,
    dp_replies,
    replies_for,
    rounds,
    run_and_resume_exactly,
    setup_strategy,
    weights,
)
from peft import PeftModel
from safetensors.torch import load_file

from conftest import assert_rel_close, tiny_overrides
from fedlora import load_config
from fedlora.client.frozen import FreezeFactor
from fedlora.models.loading import load_base_model
from fedlora.runner import run_experiment
from fedlora.strategies.base import ClientReply
from fedlora.strategies.fedsvd import FedSVD
from fedlora.strategies.lora_fair import LoRAFAIR, corrected_b
from fedlora.strategies.rolora import RoLoRA


def test_rolora_alternates_and_its_average_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    strategy = RoLoRA()
    server, init = setup_strategy(strategy, gen)
    first = server.configure(1, [0])[0]
    assert first.hooks == [FreezeFactor(factor="A")] and set(first.payload) == {A_KEY, B_KEY}
    both = ClientReply(0, {A_KEY: init[A_KEY], B_KEY: torch.ones(D, R)}, 2)
    assert "unexpected" in (server.validate_reply(first, both) or "")  # A was frozen: it must not come back
    replies = replies_for([B_KEY], gen)
    assert all(server.validate_reply(first, r) is None for r in replies)
    server.aggregate(1, replies)
    dense = sum(
        p * (r.payload[B_KEY].double() @ init[A_KEY].double()) for p, r in zip(weights(replies), replies)
    )
    got = server.global_state[B_KEY].double() @ server.global_state[A_KEY].double()
    assert_rel_close(got, dense, 1e-6)  # sum_i p_i B_i A == B_bar A
    assert torch.equal(server.global_state[A_KEY], init[A_KEY])
    second = server.configure(2, [0])[0]
    assert second.hooks == [FreezeFactor(factor="B")]
    B = server.global_state[B_KEY].clone()
    replies = replies_for([A_KEY], gen)
    server.aggregate(2, replies)
    dense = sum(p * (B.double() @ r.payload[A_KEY].double()) for p, r in zip(weights(replies), replies))
    got = server.global_state[B_KEY].double() @ server.global_state[A_KEY].double()
    assert_rel_close(got, dense, 1e-6)


def test_fedsvd_rebases_exactly_with_orthonormal_a() -> None:
    gen = torch.Generator().manual_seed(1)
    strategy = FedSVD()
    server, init = setup_strategy(strategy, gen)
    instruction = server.configure(1, [0])[0]
    assert instruction.hooks == [FreezeFactor(factor="A", freeze_heads=True)]
    replies = replies_for([B_KEY], gen)
    server.aggregate(1, replies)
    dense = sum(
        p * (r.payload[B_KEY].double() @ init[A_KEY].double()) for p, r in zip(weights(replies), replies)
    )
    A, B = server.global_state[A_KEY].double(), server.global_state[B_KEY].double()
    assert_rel_close(B @ A, dense, 1e-5)  # the re-basing keeps the product
    assert_rel_close(A @ A.T, torch.eye(R, dtype=torch.float64), 1e-5)  # orthonormal rows
    norms = B.norm(dim=0)
    assert torch.all(norms[:-1] >= norms[1:] - 1e-6)  # B = U S: columns by decreasing singular value


def test_fedsvd_completes_a_rank_deficient_round() -> None:
    gen = torch.Generator().manual_seed(2)
    strategy = FedSVD()
    server, init = setup_strategy(strategy, gen)
    low = torch.randn(D, 1, generator=gen) @ torch.randn(1, R, generator=gen)  # B_bar of rank 1
    server.aggregate(1, [ClientReply(0, {B_KEY: low}, 3)])
    A, B = server.global_state[A_KEY].double(), server.global_state[B_KEY].double()
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


def test_lora_fair_strategy_applies_each_objective_per_module() -> None:
    """Default (the paper's cosine objective): at the server's B' the dense objective 1 - cos(Delta, B' A_bar) +
    0.01 ||B' - B_bar||_F, computed here from the d x k matrices, is stationary (its autograd gradient ~ 0) and
    below the plain average's; ``correction: least-squares``: B' is the dense stacked least-squares solve."""
    from fedlora.strategies.lora_fair import LoRAFAIROptions

    gen = torch.Generator().manual_seed(4)
    strategy = LoRAFAIR()
    server, _ = setup_strategy(strategy, gen)
    replies = replies_for([A_KEY, B_KEY], gen)
    server.aggregate(1, replies)
    p = weights(replies)
    Bs = [r.payload[B_KEY].double() for r in replies]
    As = [r.payload[A_KEY].double() for r in replies]
    delta = sum(w * B @ A for w, B, A in zip(p, Bs, As))
    A_bar, B_bar = sum(w * A for w, A in zip(p, As)), sum(w * B for w, B in zip(p, Bs))
    assert_rel_close(server.global_state[A_KEY], A_bar, 1e-6)

    def dense(B: torch.Tensor) -> torch.Tensor:
        pred = B @ A_bar
        cos = (delta * pred).sum() / (delta.norm() * pred.norm())
        return 1 - cos + 0.01 * (B - B_bar).norm()

    found = server.global_state[B_KEY].double().clone().requires_grad_(True)
    value = dense(found)
    (grad,) = torch.autograd.grad(value, found)
    assert float(grad.norm()) < 1e-4 and float(value) < float(dense(B_bar)) - 1e-3
    assert float((found.detach() - B_bar).norm()) > 1e-3  # it did correct B

    squares, _ = setup_strategy(
        LoRAFAIR(LoRAFAIROptions(correction="least-squares")), torch.Generator().manual_seed(4)
    )
    squares.aggregate(1, replies)
    lam = 1e-3 * float(torch.trace(A_bar @ A_bar.T)) / R
    stacked_a = torch.cat([A_bar, (lam**0.5) * torch.eye(R, dtype=torch.float64)], dim=1)
    stacked_t = torch.cat([delta, (lam**0.5) * B_bar], dim=1)
    solve = torch.linalg.lstsq(stacked_a.T, stacked_t.T).solution.T  # independent of corrected_b
    assert_rel_close(squares.global_state[B_KEY], solve, 1e-6)


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
    # round 1 trains one factor (RoLoRA: B, FedSVD: B on its orthonormal A): the noise is on it alone, the
    # other factor keeps the payload's value
    payload, noisy, held, plain = dp_replies(tmp_path / "pair", extra)
    trained = {k for k in payload if ".lora_B." in k}
    assert_noise_reaches_only(trained, payload, noisy, held, plain)


def test_fedsvd_keeps_a_classification_head_frozen_as_the_reference_does(tmp_path: Path) -> None:
    """head: frozen (the default; the reference's freeze_target_layers): the classifier neither trains nor
    travels and the global head stays the initial one; head: trained sends it and averages it."""
    from conftest import labelled_rows, record_replies, tiny_engine

    data = labelled_rows(tmp_path)
    extra = {
        "model.task": "classification",
        "data.source": "json",
        "data.path": str(data),
        "strategy.name": "fedsvd",
    }
    for head in ("frozen", "trained"):
        engine = tiny_engine(tmp_path / head, **extra, **{"strategy.options": f"{{head: {head}}}"})
        initial = {k: v.clone() for k, v in engine.sim.server.global_state.items() if ".lora_" not in k}
        assert initial
        sent = record_replies(engine)
        assert engine.run_round(1)["rejected"] == []
        state = engine.sim.server.global_state
        travelled = any(set(initial) & set(r.payload) for r in sent)
        unchanged = all(torch.equal(state[k], initial[k]) for k in initial)
        assert (travelled, unchanged) == ((False, True) if head == "frozen" else (True, False))
