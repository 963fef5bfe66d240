"""federation.wire_dtype: payloads coded in bf16 / fp16 / int8 both ways (fedlora.adapters.wire), against a
direct float64 computation of each rule, and a run that sends the bytes it counts."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import relative_error, tiny_overrides
from fedlora.adapters.state import from_bytes, to_bytes, wire_size
from fedlora.adapters.wire import (
    MIN_CODED_ELEMENTS,
    decode_state,
    encode_reply,
    encode_state,
    restore_updates,
)
from fedlora.errors import ConfigError
from fedlora.preflight import load_config
from fedlora.runner import run
from fedlora.testing.conformance import relative_error as state_error


def lora_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.q_proj.lora_A.weight": torch.randn(8, 96, generator=g),  # r x k: rows are the shorter side
        "m.q_proj.lora_B.weight": torch.randn(64, 8, generator=g) * 1e-3,  # d x r: columns are
        "m.score.weight": torch.randn(5, 64, generator=g),  # a classifier head (320 entries)
        "m.norm.weight": torch.randn(64, generator=g),  # a vector: travels as it is
        "m.latent": torch.randn(4, 4, generator=g),  # below MIN_CODED_ELEMENTS: as it is
        "seeds": torch.arange(3, dtype=torch.int64),
    }


def int8_reference(x: torch.Tensor) -> torch.Tensor:
    """The int8 rule computed directly in float64: scales per row of the shorter side."""
    m = x.double().reshape(x.shape[0], -1)
    rows = m.T if m.shape[0] > m.shape[1] else m
    scale = rows.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(rows / torch.where(scale > 0, scale, torch.ones_like(scale)))
    out = q * scale
    return (out.T if m.shape[0] > m.shape[1] else out).reshape(x.shape)


def test_each_wire_dtype_against_its_rule():
    state = lora_state()
    matrices = [k for k, v in state.items() if v.dim() >= 2 and v.numel() >= MIN_CODED_ELEMENTS]
    assert encode_state(state, "fp32") is state and decode_state(state) is state
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        back = decode_state(from_bytes(to_bytes(encode_state(state, dtype))))  # through safetensors bytes
        assert set(back) == set(state) and all(v.dtype == state[k].dtype for k, v in back.items())
        for key in matrices:  # round to nearest even in that dtype, exactly torch's cast
            assert torch.equal(back[key], state[key].to(torch_dtype).float())
        for key in set(state) - set(matrices):
            assert torch.equal(back[key], state[key])
    wire = encode_state(state, "int8")
    back = decode_state(from_bytes(to_bytes(wire)))
    for key in matrices:
        reference = int8_reference(state[key])
        assert relative_error(back[key], reference) < 1e-6  # float32 arithmetic against float64
        m = state[key].double().reshape(state[key].shape[0], -1)
        side = m.T if m.shape[0] > m.shape[1] else m
        bound = (side.abs().amax(dim=1) / 127 / 2).max()
        assert (back[key].double() - state[key].double()).abs().max() <= bound * (1 + 1e-5)
    for key in set(state) - set(matrices):
        assert torch.equal(back[key], state[key])
    # the B factor (64 x 8) gets 8 scales, one per rank component; A (8 x 96) 8, one per row
    assert wire["m.q_proj.lora_B.weight::int8-scale"].shape == (8,)
    assert wire["m.q_proj.lora_A.weight::int8-scale"].shape == (8,)
    payload = sum(state[k].numel() for k in matrices)
    assert wire_size(wire) < wire_size(state) - 3 * payload + 512  # ~1 byte an entry (+ scales, header)
    with pytest.raises(ValueError, match="wire dtype 'int4'"):
        encode_state(state, "int4")


def test_zero_rows_and_non_finite_values():
    state = {"w": torch.zeros(16, 32)}
    state["w"][3] = torch.linspace(-1, 1, 32)
    back = decode_state(encode_state(state, "int8"))
    assert torch.equal(back["w"][0], torch.zeros(32)) and torch.isfinite(back["w"]).all()
    state["w"][5, 7] = float("nan")  # a corrupted reply stays non-finite, so the screens reject it
    for dtype in ("bf16", "fp16", "int8"):
        assert not torch.isfinite(decode_state(encode_state(state, dtype))["w"]).all(), dtype
    big = {"w": torch.full((16, 32), 1e6)}  # beyond fp16's range: inf, never a silently wrong finite value
    assert torch.isinf(decode_state(encode_state(big, "fp16"))["w"]).all()


def test_uploads_carry_the_update_and_error_feedback_loses_no_mass():
    """A reply travels as x - x_start (+ the residual): the server restores x_start + Delta^, whose error is
    the update's rounding, not the state's; with error feedback the sum of what arrived over T rounds is the
    sum of the true updates minus the last residual, exactly (float64 reference), so it does not drift."""
    start = decode_state(encode_state(lora_state(0), "int8"))  # what the client got
    step = {k: 1e-3 * v for k, v in lora_state(1).items() if v.is_floating_point()}
    state = {k: start[k] + step[k] if k in step else start[k] for k in start}
    wire, error = encode_reply(state, start, "int8")
    assert any(k.endswith("::delta::int8") or k.endswith("::delta::int8-t") for k in wire)
    back = restore_updates(decode_state(from_bytes(to_bytes(wire))), start)
    assert set(back) == set(state)
    as_state = decode_state(encode_state(state, "int8"))  # the state coded directly, for comparison
    key = "m.q_proj.lora_A.weight"
    update_error = relative_error(back[key] - start[key], state[key] - start[key])
    state_error_ = relative_error(as_state[key] - start[key], state[key] - start[key])
    assert update_error < 0.01 < state_error_
    assert torch.equal(encode_reply(state, start, "fp32")[0]["seeds"], state["seeds"])
    # error feedback over 20 rounds of the same true update
    residual: dict[str, torch.Tensor] | None = None
    arrived = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in error.items()}
    for _ in range(20):
        wire, residual_next = encode_reply(state, start, "int8", residual)
        sent = decode_state(wire)  # the updates as they arrive
        for k in arrived:
            arrived[k] += sent[k + "::delta"].double()
        residual = residual_next
    assert residual is not None
    for k in arrived:
        true = 20 * (state[k] - start[k]).double()
        assert relative_error(arrived[k], true - residual[k].double()) < 1e-5
        assert residual[k].abs().max() <= (state[k] - start[k]).abs().max()  # bounded, not growing


def test_a_run_sends_fewer_bytes_and_the_same_bits_through_worker_processes(tmp_path):
    """bytes_up / bytes_down count the coded payloads; worker processes (safetensors bytes between processes)
    end with the same adapter bit for bit as the clients in process; the held-out loss stays near fp32's."""
    base = [*tiny_overrides(tmp_path), "federation.rounds=2", "output.plot=false", "adapter.rank=8"]
    runs = {}
    for name, extra in {
        "fp32": [],
        "int8": ["federation.wire_dtype=int8"],
        "int8-workers": ["federation.wire_dtype=int8", "compute.workers=2"],
        "int8-feedback": ["federation.wire_dtype=int8", "federation.wire_error_feedback=true"],
        "bf16": ["federation.wire_dtype=bf16"],
    }.items():
        runs[name] = run(load_config(None, base + extra), tmp_path / name, show_progress=False)
    fp32 = runs["fp32"].records[-1]
    for name in ("fp32", "int8", "bf16"):  # FedIT: every payload, both ways, has the global adapter's shapes
        record, state = runs[name].records[-1], runs[name].final_state
        one = wire_size(encode_state(state, name))
        assert record["bytes_down"] == one * record["num_clients"], name
        lines = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["clients"]
        assert sum(c["bytes_up"] for c in lines) == record["bytes_up"]
        # an upload is the same tensors, each key (and its scale's) 7 characters longer: "::delta"
        assert all(one <= c["bytes_up"] <= one + 14 * len(state) + 8 for c in lines), name
    assert runs["int8"].records[-1]["bytes_up"] < 0.4 * fp32["bytes_up"]  # 1 byte an entry + scales + header
    assert runs["bf16"].records[-1]["bytes_up"] < 0.55 * fp32["bytes_up"]
    workers = runs["int8-workers"].final_state
    assert all(torch.equal(workers[k], runs["int8"].final_state[k]) for k in workers)
    assert list((tmp_path / "int8-feedback" / "personal").glob("client_*.wire-residual.r*.safetensors"))
    assert not (tmp_path / "int8" / "personal").exists() or not list(
        (tmp_path / "int8" / "personal").iterdir()
    )
    for name in ("int8", "bf16", "int8-feedback"):
        assert abs(runs[name].records[-1]["eval_loss"] - fp32["eval_loss"]) < 0.05 * fp32["eval_loss"]
    assert state_error(runs["int8"].final_state, runs["fp32"].final_state) < 0.05


def test_an_unknown_wire_dtype_is_one_line():
    with pytest.raises(ConfigError, match="federation.wire_dtype") as err:
        load_config(None, ["federation.wire_dtype=int4"])
    assert "\n" not in str(err.value).strip().split("invalid config:")[-1].strip()
    with pytest.raises(ConfigError, match="wire_error_feedback corrects the rounding of a coded wire"):
        load_config(None, ["federation.wire_error_feedback=true"])
