"""pFedLoRA: clients of different architectures share one adapter tensor set; alternating training;
personal weights on disk; personalised evaluation; the standalone baseline."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_engine
from fedlora.client.settings import LocalTrainingSettings
from fedlora.client.trainer import train_locally
from fedlora.config.loader import ConfigError
from fedlora.engine.server import Server
from fedlora.strategies.base import ServerSetup
from fedlora.strategies.lg_fedavg import LGFedAvg
from fedlora.strategies.pfedlora import LocalModelPhase

VARIANTS = {
    "strategy.name": "pfedlora",
    "model.tiny_num_layers": 3,
    "model.variants": "[{num_layers: 3}, {num_layers: 2}, {num_layers: 1}]",
    "adapter.target_modules": "[q_proj, v_proj]",
    "adapter.dropout": 0.0,
    "federation.clients_per_round": 4,
    "strategy.options": "{local_model_steps: 2}",
}


def test_three_architectures_share_one_adapter_tensor_set(tmp_path: Path) -> None:
    engine = tiny_engine(tmp_path, **VARIANTS)
    models = engine.sim.client_models
    assert sorted(set(models.variant_of)) == [0, 1, 2] and models.last_layer == [2, 1, 0]
    assert len({id(a.model) for a in models.adapters}) == 3  # one in-memory model per architecture
    shapes = []
    original = engine.run_client

    def spy(server_round, client_id, instruction):
        reply = original(server_round, client_id, instruction)
        shapes.append({k: tuple(v.shape) for k, v in reply.payload.items()})
        return reply

    engine.run_client = spy
    record = engine.run_round(1)
    assert record["num_clients"] == 4 and record["rejected"] == []
    assert all(s == shapes[0] for s in shapes) and all(".layers.last." in k for k in shapes[0])
    # each architecture maps the shared keys to its own last layer
    local = {v: models.to_variant(engine.sim.server.global_state, v) for v in range(3)}
    assert all(f".layers.{models.last_layer[v]}." in next(iter(local[v])) for v in range(3))
    for v, adapters in enumerate(models.adapters):
        adapters.load(local[v])  # loads into that architecture's slot without error


def test_phase_one_trains_the_local_model_and_phase_two_the_adapter(tmp_path: Path) -> None:
    engine = tiny_engine(tmp_path, **VARIANTS)
    models = engine.sim.client_models
    client = engine.sim.federation.clients[0]
    adapters = models.prepare(0, 1)
    start = models.to_local(engine.sim.server.global_state, 0)
    before_local = {k: p.detach().clone() for k, p in adapters.base_parameters()}
    only_local = LocalTrainingSettings(optimizer="adamw", lr=1e-2, local_steps=1, batch_size=2)
    phase = [LocalModelPhase(steps=2)]
    result = train_locally(adapters, engine.sim.encoder, client, start, only_local, 1, phase)
    after_local = dict(adapters.base_parameters())
    assert any(not torch.equal(after_local[k], before_local[k]) for k in before_local)
    assert "local_model_loss" in result.metrics
    assert all(not p.requires_grad for _, p in adapters.base_parameters())  # frozen again for phase 2
    # phase 2 alone (local_model_steps 0): the adapter moves, the local weights do not
    frozen_local = {k: p.detach().clone() for k, p in adapters.base_parameters()}
    adapter_only = LocalTrainingSettings(optimizer="adamw", lr=1e-2, local_steps=2, batch_size=2)
    trained = train_locally(adapters, engine.sim.encoder, client, start, adapter_only, seed=2)
    assert all(torch.equal(p, frozen_local[k]) for k, p in adapters.base_parameters())
    assert any(not torch.equal(trained.state[k], start[k]) for k in start if ".lora_B." in k)


def test_personal_weights_live_on_disk_and_come_back_when_sampled(tmp_path: Path) -> None:
    engine = tiny_engine(tmp_path, **VARIANTS)
    models = engine.sim.client_models
    record = engine.run_round(1)
    trained = [c["client"] for c in record["clients"]]
    for cid in trained:
        saved = load_file(str(tmp_path / "personal" / f"client_{cid}.r1.safetensors"))
        adapters = models.prepare(cid, 2)
        assert all(torch.equal(p, saved[k]) for k, p in adapters.base_parameters())
        pristine = models.pristine[models.variant_of[cid]]
        assert any(not torch.equal(saved[k], pristine[k]) for k in saved)
    untouched = next(c for c in range(4) if c not in trained) if len(trained) < 4 else None
    if untouched is not None:
        adapters = models.prepare(untouched, 2)
        assert all(
            torch.equal(p, models.pristine[models.variant_of[untouched]][k])
            for k, p in adapters.base_parameters()
        )
    # personalised evaluation: mean and spread over clients, and the model without the adapter
    for key in ("eval_loss", "eval_loss_no_adapter", "eval_client_loss_mean", "eval_client_loss_std"):
        assert key in record


def test_standalone_baseline_sends_nothing_and_keeps_own_adapters(tmp_path: Path) -> None:
    engine = tiny_engine(
        tmp_path, **{**VARIANTS, "strategy.options": "{local_model_steps: 1, federate: false}"}
    )
    record = engine.run_round(1)
    assert record["bytes_up"] == 0 and record["bytes_down"] == 0
    server = engine.sim.server
    own = [c["client"] for c in record["clients"]]
    assert {g for g in server.state.arrays if g.startswith("own-")} == {f"own-{c}" for c in own}
    a, b = server.personal_state(own[0]), server.personal_state(own[1])
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.count_nonzero(v) == 0 for k, v in server.global_state.items() if ".lora_B." in k)


def test_whole_model_fedavg_baseline_sends_the_local_weights(tmp_path: Path) -> None:
    one_arch = {
        **VARIANTS,
        "model.variants": "[{num_layers: 2}]",
        "strategy.options": "{local_model_steps: 1, share: model}",
    }
    engine = tiny_engine(tmp_path, **one_arch)
    adapter_only = tiny_engine(tmp_path / "a", **{**one_arch, "strategy.options": "{local_model_steps: 1}"})
    whole = engine.run_round(1)
    small = adapter_only.run_round(1)
    assert whole["rejected"] == [] and whole["bytes_up"] > 20 * small["bytes_up"]
    state = engine.sim.server.global_state
    assert any(".lora_" not in k for k in state) and any(".lora_" in k for k in state)
    # every client now starts from the averaged local weights
    weights = {k: v for k, v in state.items() if ".lora_" not in k}
    adapters, _ = engine.sim.client_models.install(0, 2, state)
    assert all(torch.equal(p, weights[k]) for k, p in adapters.base_parameters())


def test_fedlora_eval_of_a_pfedlora_run_is_personalised(tmp_path: Path, capsys) -> None:
    import json

    from conftest import tiny_overrides
    from fedlora.cli import main

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, **{**VARIANTS, "federation.rounds": 1})
    assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["eval_loss"] == last["eval_loss"] and "eval_loss_no_adapter" in metrics


def test_pfedlora_without_client_models_is_refused(tmp_path: Path) -> None:
    import pytest

    from conftest import tiny_overrides
    from fedlora import load_config
    from fedlora.config.loader import ConfigError
    from fedlora.runner import build_simulation

    with pytest.raises(ConfigError, match="give model.variants"):
        build_simulation(load_config(None, tiny_overrides(tmp_path, **{"strategy.name": "pfedlora"})))


WIDTHS = {
    **LGFedAvg.conformance_overrides,  # BBC News on the common representation space (shared_dim 16)
    "strategy.name": "pfedlora",
    "federation.num_clients": 6,
    "federation.clients_per_round": 6,
    # three widths (64, 32 and MiniLM's 384), two architectures and two tokenizers
    "model.variants": "[{tiny_hidden_size: 64}, {tiny_hidden_size: 32}, {name: all-minilm-l6-v2, num_layers: 1}]",
    "adapter.dropout": 0.0,
    "strategy.options": "{local_model_steps: 1}",
}


def test_clients_of_different_widths_share_a_representation_adapter(tmp_path: Path) -> None:
    engine = tiny_engine(tmp_path, **WIDTHS)
    models = engine.sim.client_models
    widths = [b.model.config.hidden_size for b in models.bundles]
    assert widths == [64, 32, 384] and models.head_name == ["score", "score", "classifier"]
    assert type(models.encoder_of(models.variant_of.index(2)).tokenizer).__name__.startswith("Bert")
    spied = spy_payloads(engine)
    record = engine.run_round(1)
    payloads = [payload for _, payload, _ in spied]
    assert record["num_clients"] == 6 and record["rejected"] == []
    # the same tensor set from every architecture: rank x shared_dim and shared_dim x rank
    shapes = {k: tuple(v.shape) for k, v in payloads[0].items()}
    wire = "base_model.model.shared.bridge"
    assert shapes == {f"{wire}.lora_A.weight": (4, 16), f"{wire}.lora_B.weight": (16, 4)}
    assert all({k: tuple(v.shape) for k, v in p.items()} == shapes for p in payloads)
    # the server's average is the example-weighted mean of what the clients sent
    replies = [(p, c["num_examples"]) for p, c in zip(payloads, record["clients"], strict=True)]
    total = sum(n for _, n in replies)
    for key in shapes:
        dense = sum(p[key].double() * n / total for p, n in replies)
        assert torch.linalg.norm(
            engine.sim.server.global_state[key].double() - dense
        ) <= 1e-6 * torch.linalg.norm(dense)
    # on each architecture the shared adapter is a residual low-rank map of the common space: with the
    # bridge at the identity, head(h) = C(gelu(P h) + s B A gelu(P h))
    for variant, adapters in enumerate(models.adapters):
        adapters.load(models.to_variant(engine.sim.server.global_state, variant))
        model = adapters.model.get_base_model()
        head = getattr(model, models.head_name[variant])
        h = torch.randn(3, widths[variant])
        u = torch.nn.functional.gelu(head.project(h))
        a, b = (engine.sim.server.global_state[f"{wire}.lora_{f}.weight"] for f in "AB")
        scale = engine.sim.adapters.cfg.alpha / engine.sim.adapters.cfg.rank
        expected = head.classifier(u @ head.bridge.base_layer.weight.T + scale * u @ a.T @ b.T)
        assert torch.allclose(head(h), expected, atol=1e-5)
    assert "eval_accuracy" in record and "eval_accuracy_no_adapter" in record


def test_different_widths_on_the_last_layer_are_refused_with_the_way_out(tmp_path: Path) -> None:
    from conftest import tiny_overrides
    from fedlora import load_config
    from fedlora.runner import build_simulation

    overrides = tiny_overrides(
        tmp_path,
        **{
            **WIDTHS,
            "model.shared_adapter": "last-layer",
            "adapter.target_modules": "[q_proj, v_proj]",
            "model.variants": "[{tiny_hidden_size: 64}, {tiny_hidden_size: 32}]",
        },
    )
    with pytest.raises(ValueError, match="set model.shared_adapter: representation"):
        build_simulation(load_config(None, overrides))
    with pytest.raises(ConfigError, match="shared_adapter 'representation' sits before a classifier"):
        load_config(None, tiny_overrides(tmp_path, **{"model.shared_adapter": "representation"}))


def wire_size(state) -> int:
    from fedlora.adapters.state import wire_size as size

    return size(state)


def spy_payloads(engine) -> list:
    payloads = []
    original = engine.run_client

    def spy(server_round, client_id, instruction):
        reply = original(server_round, client_id, instruction)
        payloads.append((client_id, reply.payload, reply.num_examples))
        return reply

    engine.run_client = spy
    return payloads


def test_lg_fedavg_trains_each_own_model_and_averages_the_head_on_the_common_space(tmp_path: Path) -> None:
    engine = tiny_engine(tmp_path, **{**WIDTHS, "strategy.name": "lg-fedavg", "strategy.options": "{}"})
    models = engine.sim.client_models
    payloads = spy_payloads(engine)
    pristine = {c: {k: v.clone() for k, v in models.prepare(c, 1).base_parameters()} for c in range(6)}
    record = engine.run_round(1)
    assert record["rejected"] == [] and len(payloads) == 6
    labels = engine.sim.federation.num_labels
    shapes = {"shared.classifier.weight": (labels, 16), "shared.classifier.bias": (labels,)}
    assert all({k: tuple(v.shape) for k, v in p.items()} == shapes for _, p, _ in payloads)
    # the reference's rule (main_lg.py): the unweighted mean over the round's clients
    for key in shapes:
        dense = sum(p[key].double() for _, p, _ in payloads) / len(payloads)
        got = engine.sim.server.global_state[key].double()
        assert torch.linalg.norm(got - dense) <= 1e-6 * torch.linalg.norm(dense)
    # weighting: examples, p_i = n_i / sum n_j, on the same replies
    from fedlora.strategies.base import ClientReply
    from fedlora.strategies.lg_fedavg import LGFedAvg, LGFedAvgOptions

    sizes = [2 + 3 * i for i in range(len(payloads))]  # unequal counts, so that the two rules differ
    weighted = Server(
        LGFedAvg(LGFedAvgOptions(weighting="examples")), ServerSetup(engine.sim.server.global_state, {}, 1.0)
    )
    weighted.aggregate(1, [ClientReply(c, p, n, {}) for (c, p, _), n in zip(payloads, sizes, strict=True)])
    for key in shapes:
        dense = sum(p[key].double() * n / sum(sizes) for (_, p, _), n in zip(payloads, sizes, strict=True))
        got = weighted.global_state[key].double()
        assert torch.linalg.norm(got - dense) <= 1e-6 * torch.linalg.norm(dense)
        uniform = engine.sim.server.global_state[key].double()
        assert torch.linalg.norm(got - uniform) > 1e-3 * torch.linalg.norm(uniform)
    # every client trained its own model end to end (encoder included), and keeps it
    for client in range(6):
        own = dict(models.prepare(client, 2).base_parameters())
        moved = [k for k in own if not torch.equal(own[k], pristine[client][k])]
        assert any("project" in k for k in moved) and any("layer" in k for k in moved)
    assert record["bytes_up"] == sum(wire_size(p) for _, p, _ in payloads)  # the head only: a few KB
    assert "eval_accuracy" in record


def test_fedproto_shares_class_prototypes_of_the_common_space(tmp_path: Path) -> None:
    from fedlora.strategies.base import ClientReply
    from fedlora.strategies.fedproto import COUNTS, PROTOTYPES, PrototypeRegularised, SharedRepresentation

    engine = tiny_engine(
        tmp_path, **{**WIDTHS, "strategy.name": "fedproto", "strategy.options": "{weight: 0.5}"}
    )
    models, server = engine.sim.client_models, engine.sim.server
    payloads = spy_payloads(engine)
    record = engine.run_round(1)
    labels = engine.sim.federation.num_labels
    assert record["rejected"] == [] and record["bytes_up"] == sum(wire_size(p) for _, p, _ in payloads)
    assert all(
        p.keys() == {PROTOTYPES, COUNTS} and p[PROTOTYPES].shape == (labels, 16) for _, p, _ in payloads
    )
    # a client's prototypes are the class means of z = gelu(P h) over its training examples, with its model
    client, payload, _ = payloads[0]
    adapters = models.prepare(client, 2)
    encoder = models.encoder_of(client)
    data = next(c for c in engine.sim.federation.clients if c.client_id == client)
    tap = SharedRepresentation(adapters.model, encoder.tokenizer.pad_token_id)
    zs, ys = [], []
    with torch.no_grad():
        for example in data.train:
            adapters.model(**encoder.training_batch([encoder.encode(example)]))
            zs.append(tap.z[0].double())
            ys.append(int(tap.labels[0]))
    tap.remove()
    for k in range(labels):
        rows = [z for z, y in zip(zs, ys, strict=True) if y == k]
        assert payload[COUNTS][k] == len(rows)
        if rows:
            mean = torch.stack(rows).mean(0)
            assert torch.linalg.norm(payload[PROTOTYPES][k].double() - mean) <= 1e-5 * torch.linalg.norm(mean)
    # the server's prototypes (the reference's proto_aggregation): per class, the unweighted mean over the
    # clients that hold it; with prototype_weighting: examples, the count-weighted mean (dense checks)
    from fedlora.strategies.fedproto import FedProto, FedProtoOptions

    counts = sum(p[COUNTS] for _, p, _ in payloads)
    weighted = Server(
        FedProto(FedProtoOptions(prototype_weighting="examples")), ServerSetup(server.global_state, {}, 1.0)
    )
    weighted.aggregate(1, [ClientReply(c, p, n, {}) for c, p, n in payloads])
    differ = 0
    for k in range(labels):
        if counts[k] > 0:
            holders = [p for _, p, _ in payloads if p[COUNTS][k] > 0]
            dense = sum(p[PROTOTYPES][k].double() for p in holders) / len(holders)
            got = server.global_state[PROTOTYPES][k].double()
            assert torch.linalg.norm(got - dense) <= 1e-6 * torch.linalg.norm(dense)
            by_count = sum(p[PROTOTYPES][k].double() * p[COUNTS][k] for _, p, _ in payloads) / counts[k]
            got = weighted.global_state[PROTOTYPES][k].double()
            assert torch.linalg.norm(got - by_count) <= 1e-6 * torch.linalg.norm(by_count)
            differ += int(torch.linalg.norm(dense - by_count) > 1e-4 * torch.linalg.norm(dense))
    assert differ > 0  # the two rules are told apart on these clients
    # a class absent from a round keeps its prototype
    before = server.global_state[PROTOTYPES].clone()
    only_zero = {
        PROTOTYPES: torch.ones(labels, 16),
        COUNTS: torch.tensor([3.0] + [0.0] * (labels - 1), dtype=torch.float64),
    }
    server.aggregate(2, [ClientReply(0, only_zero, 3, {})])
    assert torch.equal(server.global_state[PROTOTYPES][1:], before[1:])
    assert torch.equal(server.global_state[PROTOTYPES][0], torch.ones(16))

    # the client's loss term: lambda * mean (1/d) ||z - c_y||^2 over the examples whose class has a prototype
    class Ctx:
        scratch = {
            "tap": type("Tap", (), {"z": torch.ones(2, 16), "labels": torch.tensor([0, 1])})(),
            "global": (torch.zeros(labels, 16), torch.tensor([1.0] + [0.0] * (labels - 1))),
        }

    # the reference's MSELoss over the whole batch: class 0's row adds 16 (z = 1, c = 0), class 1's row (no
    # prototype yet) adds 0 but counts: 0.5 * 16 / (2 x 16); over the known rows only: 0.5 * 16 / 16
    assert float(PrototypeRegularised(weight=0.5).extra_loss(Ctx())) == 0.25
    assert float(PrototypeRegularised(weight=0.5, distance="known").extra_loss(Ctx())) == 0.5
    record2 = engine.run_round(2)
    assert record2["rejected"] == [] and "eval_accuracy" in record2


def test_head_and_prototype_baselines_need_the_representation_space(tmp_path: Path) -> None:
    from conftest import tiny_overrides
    from fedlora import load_config

    for name in ("lg-fedavg", "fedproto"):
        overrides = tiny_overrides(tmp_path, **{**VARIANTS, "strategy.name": name, "strategy.options": "{}"})
        with pytest.raises(ConfigError, match="model.shared_adapter: representation"):
            load_config(None, overrides)


@pytest.mark.parametrize(
    "setting",
    [
        {
            **VARIANTS,
            "strategy.options": "{local_model_steps: 1, federate: false}",
        },  # each client's own adapter
        {**WIDTHS, "strategy.name": "lg-fedavg", "strategy.options": "{}"},  # a shared head, not an adapter
    ],
    ids=["standalone", "lg-fedavg"],
)
def test_fedlora_eval_gives_the_runs_own_final_figures(tmp_path: Path, capsys, setting: dict) -> None:
    import json

    from conftest import tiny_overrides
    from fedlora.cli import main

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, **{**setting, "federation.rounds": 1})
    assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["eval_loss"] == last["eval_loss"]
