"""The embedded engine: sampling, one shared model, byte accounting, rejected replies, checkpoints."""

from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from fedlora import load_config
from fedlora.adapters.state import wire_size
from fedlora.client import node as node_module
from fedlora.engine.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from fedlora.engine.embedded import EmbeddedEngine, sample_clients
from fedlora.runner import build_simulation


def test_sampling_is_seeded_per_round() -> None:
    a = sample_clients(100, 10, seed=1, server_round=3)
    assert a == sample_clients(100, 10, seed=1, server_round=3) and a == sorted(a) and len(set(a)) == 10
    assert a != sample_clients(100, 10, seed=1, server_round=4)


def test_round_uses_one_shared_model_and_counts_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(None, tiny_overrides(tmp_path, **{"client.num_threads": 2}))
    sim, bundle = build_simulation(cfg)
    engine = EmbeddedEngine(sim, tmp_path)
    trained_on = []  # the model each client's local training ran on, and its base weights
    original = node_module.train_locally

    def spy(adapters, *args, **kwargs):
        trained_on.append((adapters.model, {id(p) for _, p in adapters.base_parameters()}))
        return original(adapters, *args, **kwargs)

    monkeypatch.setattr(node_module, "train_locally", spy)
    torch.set_num_threads(1)
    try:
        record = engine.run_round(1)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
    base = {id(p) for p in bundle.model.parameters()}
    assert (
        len(trained_on) == 2 and trained_on[0][0] is trained_on[1][0]
    )  # one shared model, no copy per client
    assert all(weights <= base for _, weights in trained_on)  # its base weights are the loaded model's own
    assert record["num_clients"] == 2 and record["rejected"] == []
    per_payload = wire_size(sim.server.global_state)
    assert record["bytes_down"] == 2 * per_payload and record["bytes_up"] == 2 * per_payload
    assert threads == 2  # client.num_threads, set by the round


def test_corrupted_reply_is_rejected_and_round_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(None, tiny_overrides(tmp_path, **{"federation.clients_per_round": 3}))
    sim, _ = build_simulation(cfg)
    engine = EmbeddedEngine(sim, tmp_path)
    sampled = sample_clients(4, 3, cfg.federation.seed, 1)
    original = engine.run_client

    def corrupt(server_round, client_id, instruction):
        reply = original(server_round, client_id, instruction)
        if client_id == sampled[0]:
            key = next(k for k in reply.payload if "lora_B" in k)
            reply.payload[key][0, 0] = float("nan")
        if client_id == sampled[1]:
            key = next(k for k in reply.payload if "lora_A" in k)
            reply.payload[key] = torch.zeros(7, reply.payload[key].shape[1])
        return reply

    monkeypatch.setattr(engine, "run_client", corrupt)
    record = engine.run_round(1)
    assert record["num_clients"] == 1 and record["num_sampled"] == 3
    reasons = {r["client"]: r["reason"] for r in record["rejected"]}
    assert "non-finite" in reasons[sampled[0]] and "given rank 4" in reasons[sampled[1]]
    assert all(torch.isfinite(v).all() for v in sim.server.global_state.values())
    assert record["eval_loss"] is not None


def test_checkpoints_are_atomic_checked_and_pruned(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for r in (1, 2, 3):
        save_checkpoint(root, r, {"w": torch.full((2,), float(r))}, {"strategy": "x"}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["round_2", "round_3"]
    assert latest_checkpoint(root).round == 3
    # damage the newest: it fails its checksum and the previous one is used
    data = bytearray((root / "round_3" / "server_state.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (root / "round_3" / "server_state.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(root / "round_3")
    found = latest_checkpoint(root)
    assert found.round == 2 and torch.equal(found.tensors["w"], torch.full((2,), 2.0))
    # a half-written temp folder is never taken for a checkpoint
    (root / ".round_4.tmp").mkdir()
    assert latest_checkpoint(root).round == 2


def test_progress_within_a_round_names_the_client_and_its_step(tmp_path: Path) -> None:
    sim, _ = build_simulation(load_config(None, tiny_overrides(tmp_path, **{"client.local_steps": 3})))
    seen: list[str] = []
    engine = EmbeddedEngine(sim, tmp_path, status=seen.append)
    engine.run_round(1)
    steps = [s for s in seen if ", step " in s]
    assert steps and steps[-1].endswith("(2/2), step 3/3")
    assert [s.rsplit("step ", 1)[1] for s in steps] == ["1/3", "2/3", "3/3"] * 2
