"""FedSA-LoRA: A averaged exactly, B never leaves its client, personal B comes back, resume is exact."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import assert_rel_close, labelled_rows, record_replies, tiny_overrides
from fedlora import load_config
from fedlora.adapters.ranks import RankProfile
from fedlora.engine.embedded import EmbeddedEngine
from fedlora.engine.server import Server
from fedlora.runner import build_simulation, run_experiment
from fedlora.strategies.base import ClientReply, ServerSetup
from fedlora.strategies.fedsa_lora import STORE_NAME, FedSALoRA, PrivateB

SQUARE = {"adapter.target_modules": "[q_proj, o_proj]", "adapter.dropout": 0.0, "strategy.name": "fedsa-lora"}


def test_a_is_averaged_with_example_weights_and_b_never_travels() -> None:
    gen = torch.Generator().manual_seed(0)
    init = {
        "m.q_proj.lora_A.weight": torch.randn(4, 12, generator=gen),
        "m.q_proj.lora_B.weight": torch.zeros(10, 4),
    }
    strategy = FedSALoRA()
    server = Server(
        strategy, ServerSetup(init, {i: RankProfile.uniform(4) for i in range(3)}, lora_alpha=8.0)
    )
    instruction = server.configure(1, [0])[0]
    assert list(instruction.payload) == ["m.q_proj.lora_A.weight"] and instruction.hooks == [
        PrivateB(local_head=True)
    ]
    As = [torch.randn(4, 12, generator=gen) for _ in range(3)]
    sizes = [2, 5, 9]
    replies = [ClientReply(i, {"m.q_proj.lora_A.weight": A}, n) for i, (A, n) in enumerate(zip(As, sizes))]
    assert all(server.validate_reply(instruction, r) is None for r in replies)
    server.aggregate(1, replies)
    dense = sum(n / 16 * A.double() for A, n in zip(As, sizes))
    assert_rel_close(server.global_state["m.q_proj.lora_A.weight"], dense, 1e-6)
    full = server.evaluation_state()  # the server holds no B
    assert list(full) == list(init) and torch.count_nonzero(full["m.q_proj.lora_B.weight"]) == 0


def test_each_client_keeps_and_gets_back_its_own_b(tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(None, tiny_overrides(tmp_path, **SQUARE, **{"federation.clients_per_round": 4}))
    sim, _ = build_simulation(cfg)
    engine = EmbeddedEngine(sim, tmp_path)
    original = engine.run_client
    loaded_b: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # B as a round starts, after the hook
    restore = PrivateB.before_training

    def record_start(self, ctx):  # type: ignore[no-untyped-def]
        metrics = restore(self, ctx)
        state = ctx.adapters.state()
        loaded_b[(ctx.server_round, ctx.client_id)] = {
            k: v.clone() for k, v in state.items() if ".lora_B." in k
        }
        return metrics

    monkeypatch.setattr(PrivateB, "before_training", record_start)
    seen_b: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def spy(server_round, client_id, instruction):
        reply = original(server_round, client_id, instruction)
        assert not any(".lora_B." in k for k in instruction.payload) and not any(
            ".lora_B." in k for k in reply.payload
        )
        seen_b[(server_round, client_id)] = {
            k: v.clone() for k, v in sim.adapters.state().items() if ".lora_B." in k
        }
        return reply

    engine.run_client = spy
    first = engine.run_round(1)
    second = engine.run_round(2)
    for client in range(4):
        stored = load_file(str(tmp_path / "personal" / f"client_{client}.{STORE_NAME}.r1.safetensors"))
        assert all(torch.equal(stored[k], seen_b[(1, client)][k]) for k in stored)  # what it trained, kept
        assert any(torch.count_nonzero(v) > 0 for v in stored.values())
        # round 2 starts from exactly the B this client stored after round 1 (round 1 from B = 0)
        assert loaded_b[(2, client)].keys() == stored.keys()
        assert all(torch.equal(loaded_b[(2, client)][k], stored[k]) for k in stored)
        assert all(torch.count_nonzero(v) == 0 for v in loaded_b[(1, client)].values())
    bs = [seen_b[(1, c)] for c in range(4)]
    key = next(iter(bs[0]))
    assert not torch.equal(bs[0][key], bs[1][key])  # B is personal: clients differ
    # round 2 starts from each client's own B: its personalised loss is measured on it before training
    assert all("personal_eval_loss" in c for c in first["clients"] + second["clients"])
    fedit_cfg = load_config(None, tiny_overrides(tmp_path, **{**SQUARE, "strategy.name": "fedit"}))
    fedit_up = EmbeddedEngine(build_simulation(fedit_cfg)[0], tmp_path / "fedit").run_round(1)["clients"][0][
        "bytes_up"
    ]
    assert abs(first["clients"][0]["bytes_up"] / fedit_up - 0.5) < 0.02  # A only: half of A and B


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    overrides = tiny_overrides(tmp_path, **SQUARE, **{"federation.rounds": 3})
    straight = run_experiment(load_config(None, overrides), tmp_path / "straight", show_progress=False)
    short = [o for o in overrides if not o.startswith("federation.rounds")] + ["federation.rounds=2"]
    run_experiment(load_config(None, short), tmp_path / "resumed", show_progress=False)
    run_experiment(load_config(None, overrides), tmp_path / "resumed", resume=True, show_progress=False)
    a = load_file(str(straight / "global" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "global" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trained_last = sorted((straight / "personal").glob("*.r3.safetensors"))
    assert trained_last  # the clients of round 3 kept their B
    for path in trained_last:
        mine, theirs = load_file(str(path)), load_file(str(tmp_path / "resumed" / "personal" / path.name))
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_task_head_stays_on_its_client_as_the_reference_does(tmp_path: Path) -> None:
    """head: local (the default; the reference's local_param: ['lora_B', 'classifier']): the classifier never
    travels, each client keeps its own, and the server's head stays the initial one; head: shared averages it
    with A."""
    data = labelled_rows(tmp_path)
    extra = {
        **SQUARE,
        "model.task": "classification",
        "data.source": "json",
        "data.path": str(data),
        "federation.clients_per_round": 4,
    }
    for head in ("local", "shared"):
        cfg = load_config(
            None, tiny_overrides(tmp_path, **extra, **{"strategy.options": f"{{head: {head}}}"})
        )
        sim, _ = build_simulation(cfg)
        engine = EmbeddedEngine(sim, tmp_path / head)
        initial = {k: v.clone() for k, v in sim.server.evaluation_state().items() if ".lora_" not in k}
        assert initial  # the classifier (PEFT's modules_to_save)
        sent = record_replies(engine)
        engine.run_round(1)
        head_keys = set(initial)
        exported = sim.server.evaluation_state()
        if head == "local":
            assert all(not (head_keys & set(r.payload)) for r in sent)  # the head never left a client
            assert all(torch.equal(exported[k], initial[k]) for k in head_keys)
            kept = [load_file(str(p)) for p in sorted((tmp_path / head / "personal").glob("*.safetensors"))]
            assert len(kept) == 4 and all(head_keys <= set(k) for k in kept)
            key = next(iter(head_keys))
            assert not torch.equal(kept[0][key], kept[1][key])  # each client's own head
        else:
            assert all(head_keys <= set(r.payload) for r in sent)
            total = sum(r.num_examples for r in sent)
            for key in head_keys:
                dense = sum(r.payload[key].double() * r.num_examples / total for r in sent)
                assert_rel_close(exported[key], dense, 1e-6)
