"""Secure aggregation (``federation.secure_aggregation``): Flower's SecAgg+ between fedlora's Flower transport
and fedlora's ClientApp (Flower's client mod included), behind an in-process grid; and on Flower's simulation.

The aggregate is checked against a float64 dense weighted average of the same replies, within SecAgg+'s
quantisation bound (derived from its parameters, :func:`quantisation_bound`, not measured)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora.adapters.state import AdapterState
from fedlora.engine.flower.secure import (
    fit_instruction,
    quantisation_bound,
    read_fit_request,
)
from fedlora.errors import ConfigError
from fedlora.protocol import ClientReply, plan_to_json
from fedlora.testing.conformance import Case, secure_engine
from fedlora.testing.flower_grid import FIRST_NODE

THREE = {"federation.clients_per_round": 3}


def dense_average(replies: list[ClientReply]) -> dict[str, torch.Tensor]:
    """sum_i n_i x_i / sum_i n_i in float64, tensor by tensor."""
    total = sum(r.num_examples for r in replies)
    return {
        key: sum(r.num_examples * r.payload[key].double() for r in replies) / total  # type: ignore[misc]
        for key in replies[0].payload
    }


def plain_replies(case: Case, server_round: int, clients: list[int]) -> list[ClientReply]:
    """What ``clients`` reply in round 1 of a plain (in-process) engine of the same experiment."""
    engine = case.engine("plain")
    instructions = engine.sim.server.configure(server_round, clients)
    for instruction in instructions.values():
        engine.complete(instruction)
    replies = engine.transport.train_clients(server_round, instructions)
    return [replies[c] for c in clients if isinstance(replies[c], ClientReply)]  # type: ignore[misc]


def largest_error(got: AdapterState, want: dict[str, torch.Tensor]) -> float:
    return max(float((got[k].double() - want[k]).abs().max()) for k in want)


def test_secure_round_gives_the_weighted_average_and_no_reply_reaches_the_server(tmp_path: Path) -> None:
    case = Case("fedit", tmp_path, THREE)
    engine = secure_engine(case, "secure")
    record = engine.run_round(1)
    assert record["status"] == "aggregated" and record["rejected"] == []
    clients = [line["client"] for line in record["clients"]]
    replies = plain_replies(case, 1, clients)
    fed = engine.plan.federation
    sizes = engine.sim.server.setup.client_sizes
    bound = quantisation_bound(fed, [r.num_examples for r in replies], max(sizes[c] for c in clients))
    error = largest_error(engine.sim.server.state.adapter, dense_average(replies))
    assert 0 < error <= bound, f"error {error:.3g}, bound {bound:.3g}"  # 0: nothing was quantised
    # what the server's process received from the nodes: no tensor, a masked vector from each
    counts = engine.transport.last_secure_round.counts
    assert counts.replies, "the grid counted no reply"
    for content in counts.replies:
        assert all(len(record) == 0 for record in content.array_records.values()), "a reply carried tensors"
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    masked = [c for c in counts.replies if Key.MASKED_PARAMETERS in c.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == 3
    # bytes as sent: every client's four stages, the masked vector as int64 (twice float32 and more)
    payload_bytes = 4 * sum(t.numel() for t in replies[0].payload.values())
    for line in record["clients"]:
        assert line["bytes_up"] > 2 * payload_bytes
        assert line["secagg_bytes_down"] > 0
    assert record["bytes_up"] == sum(counts.up.values())


def test_a_client_that_stops_after_sharing_its_keys_is_unmasked_without_it(tmp_path: Path) -> None:
    """SecAgg+'s dropout recovery: the third node answers the setup and key-sharing stages, then stops; the
    others' shares remove its pairwise masks and the round aggregates the two replies that came."""
    case = Case("fedit", tmp_path, THREE)
    engine = secure_engine(case, "secure", answers={FIRST_NODE + 2: 2})
    record = engine.run_round(1)
    assert record["status"] == "aggregated"
    assert record["num_clients"] == 2 and len(record["rejected"]) == 1
    stopped = record["rejected"][0]["client"]
    assert "timeout" in record["rejected"][0]["reason"] or "no reply" in record["rejected"][0]["reason"]
    clients = [line["client"] for line in record["clients"]]
    assert stopped not in clients
    replies = plain_replies(case, 1, clients)
    sizes = engine.sim.server.setup.client_sizes
    bound = quantisation_bound(
        engine.plan.federation, [r.num_examples for r in replies], max(sizes[c] for c in [*clients, stopped])
    )
    error = largest_error(engine.sim.server.state.adapter, dense_average(replies))
    assert error <= bound, f"error {error:.3g}, bound {bound:.3g}"


def test_client_level_dp_under_secure_aggregation_clips_on_the_clients(tmp_path: Path) -> None:
    """DP-FedAvg with secure aggregation: each client clips its own update to C and weighs 1, the server noises
    the average it is given. The same noise (seeded by run and round) on the same clipped average as the
    server-side wrapper's, so the two adapters agree within the quantisation bound (weights 1: m steps over m)."""
    dp = {
        **THREE,
        "privacy.enabled": "true",
        "privacy.unit": "client",
        "privacy.noise_multiplier": 0.5,
        "privacy.clipping_norm": 0.01,  # below the updates' norms: every client clips
    }
    case = Case("fedit", tmp_path, dp)
    server_side, secure = case.engine("server-side"), secure_engine(case, "secure")
    a, b = server_side.run_round(1), secure.run_round(1)
    assert b["status"] == "aggregated" and b["epsilon_client"] == a["epsilon_client"] > 0
    assert all(line["clipped"] == 1.0 for line in b["clients"])
    assert all(line["clipped"] == 1.0 for line in a["clients"])
    bound = quantisation_bound(secure.plan.federation, [1, 1, 1], 1.0)
    error = largest_error(
        secure.sim.server.state.adapter,
        {k: v.double() for k, v in server_side.sim.server.state.adapter.items()},
    )
    assert error <= bound * (1 + 1e-6) + 1e-7, f"error {error:.3g}, bound {bound:.3g}"


def test_secure_rounds_repeat_bit_for_bit(tmp_path: Path) -> None:
    """The masks are random but cancel exactly; the stochastic rounding is seeded by (round, client, plan)."""
    case = Case("ffa-lora", tmp_path, THREE)
    first, second = secure_engine(case, "first"), secure_engine(case, "second")
    for engine in (first, second):
        engine.run_round(1)
    a, b = first.sim.server.state.adapter, second.sim.server.state.adapter
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fit_records_carry_the_request_exactly(tmp_path: Path) -> None:
    from flwr.compat.common import recorddict_compat as compat

    engine = Case("ffa-lora", tmp_path).engine("records")
    instruction = engine.sim.server.configure(1, [2])[2]
    engine.complete(instruction)
    content = compat.fitins_to_recorddict(fit_instruction(1, 2, instruction, True), keep_input=True)
    server_round, client, got, assigned = read_fit_request(content)
    assert (server_round, client, assigned) == (1, 2, True)
    assert plan_to_json(got) == plan_to_json(instruction)
    assert got.payload.keys() == instruction.payload.keys()
    assert all(torch.equal(got.payload[k], v) for k, v in instruction.payload.items())


@pytest.mark.parametrize(
    "overrides",
    [
        {"federation.wire_dtype": "int8"},
        {"federation.aggregation": "median", "federation.clients_per_round": 3},
        {"federation.clip_update_norm": 1.0},
        {"federation.clients_per_round": 1},
        {
            "privacy.enabled": "true",
            "privacy.unit": "client",
            "privacy.noise_multiplier": 1.0,
            "privacy.adaptive_clipping": "true",
        },
        {"strategy.name": "flexlora"},
    ],
)
def test_what_secure_aggregation_cannot_run_is_refused_before_any_work(
    overrides: dict[str, object], tmp_path: Path
) -> None:
    case = Case("fedit", tmp_path, {"federation.secure_aggregation": "true", **overrides})
    with pytest.raises(ConfigError, match="secure_aggregation"):
        case.config()


def test_secure_aggregation_is_refused_on_the_embedded_engine(tmp_path: Path) -> None:
    from fedlora.runner import run_experiment

    config = Case("fedit", tmp_path, {"federation.secure_aggregation": "true"}).config()
    with pytest.raises(ConfigError, match="engine: flower-sim"):
        run_experiment(config, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


def test_secure_aggregation_on_flower_simulation(tmp_path: Path) -> None:
    """The whole path on Flower's simulation runtime (Ray actors with fedlora's ClientApp, the ServerApp with
    SecAgg+'s workflow): the run ends with the plain (embedded) run's adapter within the quantisation (a relative
    error of the effective weights; two rounds, so training moves it a little further than one entry's bound)."""
    from safetensors.torch import load_file

    from fedlora.runner import run_experiment
    from fedlora.testing.conformance import relative_error

    case = Case("fedit", tmp_path, THREE)
    run_experiment(case.config(), tmp_path / "plain", show_progress=False)  # = flower-sim's (test_flower_sim)
    secure = case.config(engine="flower-sim", **{"federation.secure_aggregation": "true"})
    run_experiment(secure, tmp_path / "secure", show_progress=False)
    files = [tmp_path / d / "global" / "adapter_model.safetensors" for d in ("plain", "secure")]
    plain, ours = (load_file(str(f)) for f in files)
    assert relative_error(ours, plain) < 1e-3
    import json

    records = [json.loads(line) for line in (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["status"] == "aggregated" and r["num_clients"] == 3 for r in records)
