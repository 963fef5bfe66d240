"""Injected faults: dropouts, stragglers, corrupted updates; minimum replies; update-norm checks."""

from pathlib import Path

import pytest
import torch

from conftest import tiny_engine
from fedlora import load_config
from fedlora.adapters.state import update_norm
from fedlora.engine import embedded
from fedlora.engine.embedded import EmbeddedEngine, sample_clients
from fedlora.engine.faults import Fault, plan_faults


def engine_with(tmp_path: Path, **extra: object) -> EmbeddedEngine:
    return tiny_engine(tmp_path, **{"federation.clients_per_round": 4, **extra})


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("nan", "non-finite"),
        ("inf", "non-finite"),
        ("shape", "shape"),
        ("rank", "given rank"),
        ("norm", "median"),
    ],
)
def test_each_corruption_is_rejected_and_the_round_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, reason: str
) -> None:
    engine = engine_with(tmp_path)
    victim = sample_clients(4, 4, 0, 1)[1]
    monkeypatch.setattr(embedded, "plan_faults", lambda *a: {victim: Fault("corrupt", kind)})
    before = {k: v.clone() for k, v in engine.sim.server.global_state.items()}
    record = engine.run_round(1)
    assert record["status"] == "aggregated" and record["num_clients"] == 3
    assert [r["client"] for r in record["rejected"]] == [victim] and reason in record["rejected"][0]["reason"]
    assert record["faults"]["corrupted"] == [{"client": victim, "kind": kind}]
    state = engine.sim.server.global_state
    assert all(torch.isfinite(v).all() for v in state.values())
    assert any(not torch.equal(state[k], before[k]) for k in state)


def test_dropouts_and_stragglers_are_logged_and_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_with(tmp_path)
    a, b, *_ = sample_clients(4, 4, 0, 1)
    monkeypatch.setattr(embedded, "plan_faults", lambda *args: {a: Fault("dropout"), b: Fault("straggler")})
    record = engine.run_round(1)
    assert (
        record["num_clients"] == 2 and record["faults"]["dropped"] == [a] and record["faults"]["late"] == [b]
    )
    reasons = {r["client"]: r["reason"] for r in record["rejected"]}
    assert "dropped out" in reasons[a] and "straggler" in reasons[b]
    assert record["bytes_up"] == sum(c["bytes_up"] for c in record["clients"]) and len(record["clients"]) == 2


def test_too_few_replies_skip_or_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    everyone_drops = lambda cfg, seed, rnd, attempt, clients: {c: Fault("dropout") for c in clients}  # noqa: E731
    engine = engine_with(tmp_path, **{"federation.min_replies": 2})
    monkeypatch.setattr(embedded, "plan_faults", everyone_drops)
    before = {k: v.clone() for k, v in engine.sim.server.global_state.items()}
    record = engine.run_round(1)
    assert record["status"] == "skipped" and record["attempts"] == 1 and record["num_clients"] == 0
    assert all(torch.equal(v, before[k]) for k, v in engine.sim.server.global_state.items())

    first_attempt_fails = lambda cfg, seed, rnd, attempt, clients: (  # noqa: E731
        {c: Fault("dropout") for c in clients} if attempt == 0 else {}
    )
    engine = engine_with(tmp_path, **{"federation.min_replies": 2, "federation.on_too_few": "retry"})
    monkeypatch.setattr(embedded, "plan_faults", first_attempt_fails)
    record = engine.run_round(1)
    assert record["status"] == "aggregated" and record["attempts"] == 2 and record["num_clients"] == 4


def test_update_norm_limit_and_clipping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_with(tmp_path, **{"federation.max_update_norm": 1e-12})
    record = engine.run_round(1)
    assert record["status"] == "skipped" and all("max_update_norm" in r["reason"] for r in record["rejected"])

    engine = engine_with(tmp_path, **{"federation.clip_update_norm": 1e-3})
    seen = []
    original = engine.sim.server.aggregate
    sent = {k: v.clone() for k, v in engine.sim.server.global_state.items()}

    def spy(server_round, replies):
        seen.extend(update_norm(sent, r.payload) for r in replies)
        return original(server_round, replies)

    monkeypatch.setattr(engine.sim.server, "aggregate", spy)
    engine.run_round(1)
    assert len(seen) == 4 and all(n == pytest.approx(1e-3, rel=1e-4) for n in seen)


def test_fault_plan_is_seeded_and_follows_the_fractions() -> None:
    cfg = load_config(None, ["faults.dropout=0.2", "faults.straggler=0.1", "faults.corrupt=0.3"]).faults
    plan = plan_faults(cfg, 0, 1, 0, list(range(2000)))
    assert plan == plan_faults(cfg, 0, 1, 0, list(range(2000)))
    kinds = [f.kind for f in plan.values()]
    assert abs(kinds.count("dropout") / 2000 - 0.2) < 0.03 and abs(kinds.count("corrupt") / 2000 - 0.3) < 0.03
    assert {f.corruption for f in plan.values() if f.kind == "corrupt"} == {
        "nan",
        "inf",
        "shape",
        "rank",
        "norm",
    }
