"""Nothing poisoned: corrupted updates screened with any number of replies, example counts checked against
what the server knows, robust aggregation rules against a dense computation, runs that cannot progress fail."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_rel_close, tiny_engine, tiny_overrides
from fedlora import load_config
from fedlora.adapters.ranks import RankProfile
from fedlora.cli import main
from fedlora.config.loader import ConfigError
from fedlora.engine.faults import corrupt
from fedlora.engine.server import Server
from fedlora.protocol import ClientInstruction, ClientReply
from fedlora.strategies.base import ServerSetup
from fedlora.strategies.fedavg import FedIT
from fedlora.strategies.flexlora import FlexLoRA
from fedlora.strategies.robustness import (
    NORMS_FACT,
    RobustAggregation,
    UpdateNormScreen,
    coordinate_median,
    trimmed_count,
    trimmed_mean,
)


def screened(history: list[float] | None = None) -> Server:
    """FedIT inside the update-norm screen, started with ``history`` as the accepted update norms so far."""
    start = {"m.lora_A.weight": torch.zeros(3, 4), "m.lora_B.weight": torch.zeros(5, 3)}
    screen = UpdateNormScreen(FedIT(), load_config(None, []).federation)
    setup = ServerSetup(
        start, {i: RankProfile.uniform(3) for i in range(4)}, 8.0, client_sizes={i: 10 for i in range(4)}
    )
    server = Server(screen, setup)
    server.state = server.state.evolve(facts={NORMS_FACT: list(history or [])})
    return server


def reply_at(client: int, scale: float, gen: torch.Generator) -> ClientReply:
    return ClientReply(
        client,
        {
            "m.lora_A.weight": scale * torch.randn(3, 4, generator=gen),
            "m.lora_B.weight": scale * torch.randn(5, 3, generator=gen),
        },
        5,
    )


def run_screen(screen: Server, replies: list[ClientReply]) -> tuple[list[int], list[str]]:
    instructions = screen.configure(1, [r.client_id for r in replies])
    review = screen.review(1, [(instructions[r.client_id], r) for r in replies])
    return [r.client_id for r in review.accepted], [reason for _, reason in review.rejected]


def test_one_corrupted_reply_of_two_is_rejected_even_without_history() -> None:
    gen = torch.Generator().manual_seed(0)
    honest, poisoned = reply_at(0, 0.01, gen), reply_at(1, 0.01, gen)
    poisoned.payload = corrupt(poisoned.payload, "norm")
    kept, reasons = run_screen(screened(), [honest, poisoned])  # B = A = 0 sent: no start-point reference
    assert kept == [0] and "the round's smaller update" in reasons[0]


def test_two_corrupted_of_three_are_rejected_against_the_history() -> None:
    gen = torch.Generator().manual_seed(1)
    replies = [reply_at(i, 0.01, gen) for i in range(3)]
    for r in replies[1:]:
        r.payload = corrupt(r.payload, "norm")
    kept, reasons = run_screen(
        screened(history=[0.04, 0.05, 0.06]), replies
    )  # the round's median is poisoned
    assert kept == [0] and all("recent accepted updates" in r for r in reasons)


def test_an_inflated_example_count_is_rejected() -> None:
    gen = torch.Generator().manual_seed(2)
    liar = reply_at(0, 0.01, gen)
    liar.num_examples = 10**12
    reason = screened().validate_reply(ClientInstruction(screened().global_state), liar)
    assert reason == "claims 1000000000000 examples; client 0 holds 10"


@pytest.mark.parametrize("n", [4, 5, 7])
def test_robust_rules_against_a_dense_computation(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    tensors = [torch.randn(6, 5, generator=gen) for _ in range(n)]
    stacked = torch.stack([t.double() for t in tensors]).numpy()
    import numpy as np

    assert_rel_close(coordinate_median(tensors), np.median(stacked, axis=0), 1e-12)
    cut = max(1, int(0.2 * n))  # at least one value dropped per side
    ordered = np.sort(stacked, axis=0)
    assert_rel_close(trimmed_mean(tensors, 0.2), ordered[cut : n - cut].mean(axis=0), 1e-12)
    # through the wrapper: a linear method aggregates the one combined reply, whatever the example counts
    start = {"w": torch.zeros(6, 5, dtype=torch.float64)}
    wrapped = Server(
        RobustAggregation(FedIT(), "median"),
        ServerSetup(start, {i: RankProfile.uniform(3) for i in range(n)}, 8.0),
    )
    replies = [ClientReply(i, {"w": t.double()}, 1 if i else 10**6) for i, t in enumerate(tensors)]
    assert_rel_close(wrapped.aggregate(1, replies)["w"], np.median(stacked, axis=0), 1e-12)


def test_robust_rules_refuse_methods_that_do_not_average() -> None:
    with pytest.raises(ConfigError, match="does not aggregate by averaging"):
        RobustAggregation(FlexLoRA(), "median")


def test_the_reported_attack_poisons_nothing(tmp_path: Path) -> None:
    """faults {dropout 0.3, straggler 0.2, corrupt 0.3}, min_replies 2, 36 rounds: no corrupted update gets in."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        tmp_path,
        **{
            "federation.rounds": 36,
            "federation.clients_per_round": 4,
            "federation.min_replies": 2,
            "federation.max_skipped_rounds": "null",  # 80% faulty replies: many rounds are skipped; go on
            "faults": "{dropout: 0.3, straggler: 0.2, corrupt: 0.3, kinds: [norm, nan, inf]}",
            "client.local_steps": 1,
        },
    )
    code = main(["run", *overrides, "--output", str(run_dir), "--no-progress"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    corrupted = {(r["round"], c["client"]) for r in records for c in r.get("faults", {}).get("corrupted", [])}
    rejected = {(r["round"], x["client"]) for r in records for x in r["rejected"]}
    assert corrupted and corrupted <= rejected  # every corrupted reply was rejected
    assert code == 0 and all(r["status"] == "aggregated" or r["num_clients"] < 2 for r in records)
    from safetensors.torch import load_file

    final = load_file(str(run_dir / "global" / "adapter_model.safetensors"))
    assert (
        max(float(v.abs().max()) for v in final.values()) < 5.0
    )  # about 0.15 normally; 46,295 when poisoned


def test_a_run_that_cannot_progress_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, **{"federation.rounds": 6, "federation.max_update_norm": 1e-12})
    assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "3 rounds in a row were skipped" in err and "max_update_norm" in err
    assert not (run_dir / "global").exists()


class ClaimsGrid:
    """A Grid whose nodes answer the query with the given replies (in that order)."""

    def __init__(self, replies: list[SimpleNamespace]) -> None:
        self.replies = replies
        self.nonce = ""

    def get_node_ids(self) -> list[int]:
        return [r.metadata.src_node_id for r in self.replies]

    def push_messages(self, messages: list[dict]) -> list[str]:
        self.nonce = messages[0]["content"]["config"]["nonce"]
        for i, reply in enumerate(self.replies):
            reply.metadata.reply_to_message_id = f"m{i}"
        return [f"m{i}" for i in range(len(messages))]

    def pull_messages(self, ids: set[str]) -> list[SimpleNamespace]:
        return [r for r in self.replies if r.metadata.reply_to_message_id in ids]


def claim(node: int, partition: int, sign=None) -> SimpleNamespace:
    profile = {"partition-id": partition, "num-examples": 3}
    reply = SimpleNamespace(
        has_error=lambda: False, metadata=SimpleNamespace(src_node_id=node), profile=profile
    )
    reply.content = {"profile": profile}
    reply.sign = sign
    return reply


def failed(node: int) -> SimpleNamespace:
    error = SimpleNamespace(reason="<class 'KeyError'>:<'partition-id'>")
    return SimpleNamespace(has_error=lambda: True, error=error, metadata=SimpleNamespace(src_node_id=node))


def test_flower_partition_claims_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """A node claiming a taken or unknown partition, or failing the query, is refused and logged; the run goes
    on with the others (a bad node used to stop the deployment)."""
    from fedlora.engine.flower import FlowerTransport

    monkeypatch.setattr("flwr.app.Message", lambda **fields: fields)  # outside a Flower run: a plain record
    engine = tiny_engine(tmp_path, **{"federation.client_timeout": 5.0})  # 4 clients
    grid = ClaimsGrid(
        [claim(10, 0), claim(11, 1), claim(12, 2), failed(16), claim(13, 3), claim(14, 0), claim(15, 9)]
    )
    transport = FlowerTransport(engine.sim, grid, wait_for_nodes_s=0)
    assert transport.node_of == {0: 10, 1: 11, 2: 12, 3: 13}
    assert engine.sim.server.setup.client_sizes[0] == 3
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 3 and "failed the query" in refused[0] and "already held by node 10" in refused[1]


def test_a_node_must_prove_its_partition_with_the_key_bound_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    from fedlora.engine.flower import FlowerTransport
    from fedlora.engine.flower.tls import make_credentials, sign_claim

    monkeypatch.setattr("flwr.app.Message", lambda **fields: fields)
    creds = make_credentials(tmp_path / "tls", nodes=5)
    keys = {i: creds.node_public_key(i).read_text() for i in range(4)}
    engine = tiny_engine(tmp_path, **{"federation.client_timeout": 5.0})
    # node 20 holds key 4 (registered with the SuperLink, say) and claims partition 1 first; node 21 is key 1's
    replies = [claim(20, 1, 4), claim(21, 1, 1), claim(22, 0, 0), claim(23, 2, 2), claim(24, 3)]
    grid = ClaimsGrid(replies)
    original_push = grid.push_messages

    def push(messages: list[dict]) -> list[str]:
        ids = original_push(messages)
        for reply in replies:  # each node signs the nonce of this query with its own key
            if reply.sign is not None:
                reply.profile["signature"] = sign_claim(
                    creds.node_key(reply.sign), grid.nonce, reply.profile["partition-id"]
                )
        return ids

    grid.push_messages = push
    transport = FlowerTransport(engine.sim, grid, wait_for_nodes_s=0, node_keys=keys)
    assert transport.node_of == {1: 21, 0: 22, 2: 23}  # partition 3's node signed nothing
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("node 20 refused: it claims partition 1 without that partition's key" in m for m in refused)
    assert any("node 24 refused" in m for m in refused)


@pytest.mark.parametrize("n", [3, 4, 8, 9])
def test_the_trimmed_mean_drops_at_least_one_value_per_side(n: int) -> None:
    """trim_fraction 0.1 of fewer than 10 replies used to drop none (the plain mean, silently): at least one
    per side now, checked against a direct sort of the values."""
    import numpy as np

    gen = torch.Generator().manual_seed(100 + n)
    tensors = [torch.randn(4, 3, generator=gen) for _ in range(n)]
    ordered = np.sort(torch.stack([t.double() for t in tensors]).numpy(), axis=0)
    assert trimmed_count(0.1, n) == 1
    assert_rel_close(trimmed_mean(tensors, 0.1), ordered[1 : n - 1].mean(axis=0), 1e-12)
    assert trimmed_count(0.1, 2) == 0  # two values: nothing can be dropped at both ends


def test_a_trim_fraction_that_trims_none_of_a_rounds_replies_is_refused() -> None:
    from fedlora.config.schema import FederationConfig

    with pytest.raises(ValueError, match=r"trim_fraction 0.1 of 8 replies per round trims nothing.*0.125"):
        FederationConfig(aggregation="trimmed-mean", clients_per_round=8)
    with pytest.raises(ValueError, match="cannot drop a value at each end"):
        FederationConfig(aggregation="trimmed-mean", clients_per_round=2)
    assert FederationConfig(aggregation="trimmed-mean", clients_per_round=8, trim_fraction=0.125)
    assert FederationConfig(aggregation="trimmed-mean", num_clients=40, fraction=0.25)  # 10 a round: trims 1
