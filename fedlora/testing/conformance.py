"""What every strategy must do, checked once for all of them (PEFT's common tests, for federated methods).

A check is a function of a :class:`Case` (one registered strategy on a tiny experiment) that raises
``AssertionError`` naming what broke. ``tests/conformance`` runs every check on every registered strategy, so
a new method is in the suite by being registered; a plugin author runs it on theirs with one call::

    from fedlora.testing import check_strategy
    check_strategy("my-method", tmp_path)            # every check; raises on the first failure

The experiment is the tiny random LLaMA on four reasoning-gym tasks (4 clients, 2 per round, 2 rounds of 2
local steps), plus what the method itself needs to run at all (``Strategy.conformance_overrides``, e.g.
``model.variants`` for methods whose clients train their own models). The checks:

- ``round``: two rounds run; every reply is accepted; each round's record has its figures.
- ``state``: the server state round-trips through its checkpoint (safetensors + JSON) bit for bit; a hook
  never changes the state it is given (aggregating again from the same state gives the same result); the
  client hooks round-trip through their JSON wire form.
- ``resume``: stopped at the round boundary and rebuilt from the checkpoint on disk (a new simulation, as a
  new process would), round 2 gives the bit-identical adapter and the same round record as the straight run.
- ``flower``: the round through Flower's message records (:class:`~fedlora.engine.flower.transport.RecordsLoopback`:
  the ``RecordDict`` s that the Flower server and ClientApp exchange) gives the embedded engine's adapter
  bit for bit. (The full flower-sim run of every method is the ``slow`` test in tests/conformance.)
- ``wire``: with ``federation.wire_dtype: int8`` and error feedback the rounds aggregate, the coded payloads
  cross Flower's records bit for bit as they cross in process, and no more bytes travel than in float32.
- ``batched``: where every client hook is batchable, ``compute.batch_clients`` gives the per-client adapter
  (relative error under 1e-4 against per-client training; float sums in another order).
- ``privacy``: with ``privacy.enabled``, of each unit (``example``: DP-SGD; ``client``: DP-FedAvg), the method
  runs a round and reports an epsilon, or the preflight refuses it in one line naming the privacy field.
- ``secure``: with ``federation.secure_aggregation``, a round through SecAgg+ (fedlora's ClientApp with
  Flower's client mod, behind an in-process grid) gives the plain round's adapter within SecAgg+'s quantisation
  bound, or the preflight refuses the method in one line naming the field.
- ``export``: the exported global model loads with plain PEFT (an adapter) or transformers (a merged or whole
  model) and gives the server's evaluation model's logits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.adapters.state import AdapterState
from fedlora.protocol import plan_from_json, plan_to_json


def measures_the_machine(key: str) -> bool:
    """Whether a figure of a round record measures the machine (timings, memory peaks), not the method."""
    return key == "seconds" or key.endswith(("_seconds", "_per_second")) or key.startswith("peak_")


#: the tiny experiment every check runs (config overrides; the method's own needs are added)
TINY_EXPERIMENT: dict[str, object] = {
    "model.name": "tiny-llama",
    "data.source": "reasoning-gym",
    "data.tasks": "[basic_arithmetic, chain_sum, gcd, lcm]",
    "data.examples_per_task": 16,
    "data.max_seq_len": 96,
    "federation.clients_per_round": 2,
    "federation.rounds": 2,
    "client.local_steps": 2,
    "client.batch_size": 2,
    "client.lr": 1e-3,
    "adapter.rank": 4,
    "output.plot": "false",
}


@dataclass
class Case:
    """One strategy under test: its name, a folder to work in, and extra config overrides."""

    strategy: str
    workdir: Path
    extra: dict[str, object] | None = None

    def overrides(self, **more: object) -> list[str]:
        from fedlora.strategies.registry import strategy_class

        items: dict[str, object] = {**TINY_EXPERIMENT, "strategy.name": self.strategy}
        items.update(strategy_class(self.strategy).conformance_overrides)
        items.update(self.extra or {})
        items.update(more)
        return [f"{k}={v}" for k, v in items.items()]

    def config(self, **more: object) -> Any:
        from fedlora.preflight import load_config

        return load_config(None, self.overrides(**more))

    def engine(self, folder: str, **more: object) -> Any:
        """An embedded engine on a fresh simulation, its run folder ``workdir/folder``."""
        return self.engine_and_model(folder, **more)[0]

    def engine_and_model(self, folder: str, **more: object) -> tuple[Any, Any]:
        """:meth:`engine` and the base model bundle it was built on (for the export)."""
        from fedlora.engine.embedded import EmbeddedEngine
        from fedlora.runner import build_simulation

        sim, bundle = build_simulation(self.config(**more))
        return EmbeddedEngine(sim, self.workdir / folder), bundle


def method_figures(record: dict[str, Any]) -> dict[str, Any]:
    """A round record without what measures the machine (timings, memory), as JSON text per key (NaN-safe)."""
    out = {}
    for key, value in record.items():
        if measures_the_machine(key):
            continue
        if key == "clients":
            value = [{k: v for k, v in c.items() if not measures_the_machine(k)} for c in value]
        out[key] = json.dumps(value, sort_keys=True)
    return out


def assert_same_bits(a: AdapterState, b: AdapterState, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: tensor names differ ({sorted(a.keys() ^ b.keys())[:3]})"
    for key in a:
        assert a[key].dtype == b[key].dtype, f"{what}: {key} is {a[key].dtype} vs {b[key].dtype}"
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def effective(state: AdapterState) -> AdapterState:
    """Each module's B A (what the adapter adds: invariant to an SVD's sign choices) and the other tensors,
    in float64."""
    out = {}
    for key, value in state.items():
        if ".lora_A." in key:
            b = state[key.replace(".lora_A.", ".lora_B.")].double()
            out[key.replace(".lora_A.", ".BA.")] = b @ value.double()
        elif ".lora_B." not in key:
            out[key] = value.double()
    return out


def relative_error(a: AdapterState, b: AdapterState) -> float:
    """||a - b|| / ||b|| of the adapters' effective weights (:func:`effective`), all tensors as one vector."""
    a, b = effective(a), effective(b)
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in b)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def check_round(case: Case) -> None:
    engine = case.engine("round")
    for server_round in (1, 2):
        record = engine.run_round(server_round)
        assert record["status"] == "aggregated", f"round {server_round}: {record['status']}"
        assert record["rejected"] == [], f"round {server_round}: replies rejected: {record['rejected']}"
        assert record["num_clients"] == record["num_sampled"] == 2
        assert all(math.isfinite(v) for v in engine.sim.server.round_metrics().values())


def check_state(case: Case) -> None:
    from fedlora.engine.server import state_from_checkpoint

    engine = case.engine("state")
    engine.run_round(1)
    server = engine.sim.server
    tensors, meta = server.checkpoint()
    meta = json.loads(json.dumps(meta))  # what the checkpoint file holds
    restored = state_from_checkpoint(tensors, meta)
    assert restored.arrays.keys() == server.state.arrays.keys(), "groups lost in the checkpoint"
    for group in restored.arrays:
        assert_same_bits(dict(restored.arrays[group]), dict(server.state.arrays[group]), f"group {group}")
        assert list(restored.arrays[group]) == list(server.state.arrays[group]), f"group {group}: key order"
    assert json.dumps(restored.facts, sort_keys=True) == json.dumps(dict(server.state.facts), sort_keys=True)
    assert restored.profiles == server.state.profiles, "rank profiles lost in the checkpoint"
    # a hook never changes the state it is given: the same round aggregated twice from it gives the same
    before = {g: {k: v.clone() for k, v in t.items()} for g, t in server.state.arrays.items()}
    instructions = server.configure(2, [0, 1])
    for instruction in instructions.values():
        engine.complete(instruction)
        again = plan_from_json(plan_to_json(instruction), instruction.payload)
        assert again.hooks == instruction.hooks and again.settings == instruction.settings, "hooks' JSON"
    replies = engine.transport.train_clients(2, instructions)
    results = [(instructions[c], r) for c, r in replies.items() if not isinstance(r, str)]
    review = server.strategy.review(server.state, 2, results)
    first = server.strategy.aggregate(review.state, 2, review.accepted)
    second = server.strategy.aggregate(review.state, 2, review.accepted)
    for group, tensors_before in before.items():
        assert_same_bits(dict(server.state.arrays[group]), tensors_before, f"state given to hooks, {group}")
    for group in first.arrays:
        assert_same_bits(dict(first.arrays[group]), dict(second.arrays[group]), f"aggregate twice, {group}")


def check_resume(case: Case) -> None:
    from fedlora.engine.checkpoint import latest_checkpoint, save_checkpoint

    straight = case.engine("straight")
    records = [method_figures(straight.run_round(r)) for r in (1, 2)]
    stopped = case.engine("stopped")
    stopped.run_round(1)
    tensors, meta = stopped.sim.server.checkpoint()
    save_checkpoint(stopped.run_dir / "checkpoints", 1, tensors, meta)
    resumed = case.engine("stopped")  # a new simulation, as a new process builds it
    checkpoint = latest_checkpoint(resumed.run_dir / "checkpoints", must_exist=True)
    assert checkpoint is not None
    resumed.sim.server.restore(checkpoint.tensors, checkpoint.meta)
    record = method_figures(resumed.run_round(2))
    assert_same_bits(resumed.sim.server.evaluation_state(), straight.sim.server.evaluation_state(), "resumed")
    differ = [k for k in records[1] if records[1][k] != record.get(k)]
    assert not differ, f"round 2's record differs after the resume in {differ}"


def check_flower(case: Case) -> None:
    from fedlora.engine.flower.transport import RecordsLoopback

    embedded = case.engine("embedded")
    flower = case.engine("records")
    assert flower.sim.node is not None
    flower.transport = RecordsLoopback(flower.sim.node)
    for server_round in (1, 2):
        a, b = embedded.run_round(server_round), flower.run_round(server_round)
        assert a["bytes_up"] == b["bytes_up"] and a["num_clients"] == b["num_clients"]
    assert_same_bits(flower.sim.server.evaluation_state(), embedded.sim.server.evaluation_state(), "flower")


def check_wire(case: Case) -> None:
    """``federation.wire_dtype: int8`` with error feedback: the coded payloads cross Flower's records exactly as
    they cross in process (the same bits, the same bytes), never more bytes than float32 (but for the
    uploads' 7-character ``::delta`` key suffixes), and the rounds still aggregate."""
    from fedlora.engine.flower.transport import RecordsLoopback

    int8 = {"federation.wire_dtype": "int8", "federation.wire_error_feedback": "true"}
    plain, coded, flower = case.engine("fp32"), case.engine("int8", **int8), case.engine("records", **int8)
    assert flower.sim.node is not None
    flower.transport = RecordsLoopback(flower.sim.node)
    for server_round in (1, 2):
        a, b, c = plain.run_round(server_round), coded.run_round(server_round), flower.run_round(server_round)
        assert b["status"] == "aggregated" and b["rejected"] == [], (
            f"int8 round {server_round}: {b['rejected']}"
        )
        assert (b["bytes_up"], b["bytes_down"]) == (c["bytes_up"], c["bytes_down"]), "bytes differ on Flower"
        suffixes = 16 * len(coded.sim.server.evaluation_state()) * b["num_clients"]
        assert b["bytes_up"] <= a["bytes_up"] + suffixes and b["bytes_down"] <= a["bytes_down"], (
            "int8 sent more"
        )
    assert_same_bits(
        flower.sim.server.evaluation_state(), coded.sim.server.evaluation_state(), "int8 on Flower"
    )


def secure_engine(case: Case, folder: str, answers: dict[int, int] | None = None, **more: object) -> Any:
    """An engine with ``federation.secure_aggregation`` whose clients are a real fedlora ClientApp (SecAgg+'s
    client mod and all) behind an in-process Flower grid (:mod:`fedlora.testing.flower_grid`), reached by the
    Flower transport; ``answers``: node -> train messages it answers before it stops."""
    from fedlora.engine.flower.apps import client_app
    from fedlora.engine.flower.transport import FlowerTransport, simulation_nodes
    from fedlora.engine.setup import build_client_node
    from fedlora.testing.flower_grid import in_process_grid

    secure = {"federation.secure_aggregation": "true", **more}
    engine = case.engine(folder, **secure)
    nodes = simulation_nodes(engine.plan.federation, len(engine.sim.federation.clients))
    app = client_app(build_client_node, case.config(**secure), case.workdir / folder / "nodes")
    grid = in_process_grid(app, nodes, answers)
    engine.transport = FlowerTransport(engine.sim, grid, routing="assigned")
    return engine


def check_secure(case: Case) -> None:
    """``federation.secure_aggregation``: the method is refused in one line naming the field, or a round
    through SecAgg+ (a real ClientApp with Flower's client mod, behind an in-process grid) aggregates to the
    plain round's adapter within SecAgg+'s quantisation bound, every entry; the next round aggregates too."""
    from fedlora.engine.flower.secure import quantisation_bound
    from fedlora.errors import ConfigError

    try:
        secure = secure_engine(case, "secure")
    except ConfigError as err:
        reason = str(err).strip().splitlines()[-1]  # a schema refusal comes under "invalid config:"
        assert "secure_aggregation" in reason, f"the refusal does not name the field: {err}"
        return
    plain = case.engine("plain")
    a, b = plain.run_round(1), secure.run_round(1)
    assert b["status"] == "aggregated" and b["rejected"] == [], f"secure round 1: {b['rejected']}"
    sizes = plain.sim.server.setup.client_sizes or {}
    weights = [c["num_examples"] for c in a["clients"]]
    bound = quantisation_bound(secure.plan.federation, weights, max(sizes[c["client"]] for c in a["clients"]))
    ours, exact = secure.sim.server.state.adapter, plain.sim.server.state.adapter
    worst = max(float((ours[k].double() - exact[k].double()).abs().max()) for k in exact)
    assert worst <= bound * (1 + 1e-6) + 1e-7, f"secure aggregate off by {worst:.3g}, bound {bound:.3g}"
    assert secure.run_round(2)["status"] == "aggregated", "secure round 2 did not aggregate"


def check_batched(case: Case) -> None:
    import pytest

    probe = case.engine("probe")
    hooks = probe.sim.strategy.client_hooks(probe.sim.server.state)
    if not all(h.batchable for h in hooks):
        pytest.skip(f"{case.strategy}'s client hooks do not batch: clients train one by one")
    same = {"federation.clients_per_round": 4, "adapter.dropout": 0.0}  # dropout masks are drawn per pass
    per_client = case.engine("per-client", **same)
    batched = case.engine("batched", **same, **{"compute.batch_clients": "true"})
    for server_round in (1, 2):
        per_client.run_round(server_round)
        record = batched.run_round(server_round)
        assert all(c.get("batched_clients") == 4 for c in record["clients"]), "the clients were not batched"
    error = relative_error(batched.sim.server.evaluation_state(), per_client.sim.server.evaluation_state())
    assert error < 1e-4, f"batched clients' adapter differs by {error:.2e} (relative)"


def check_privacy(case: Case) -> None:
    from fedlora.errors import ConfigError

    for unit, figure in (("example", "epsilon_max"), ("client", "epsilon_client")):
        dp = {"privacy.enabled": "true", "privacy.noise_multiplier": 1.0, "privacy.unit": unit}
        try:
            engine = case.engine(f"privacy-{unit}", **dp)
        except ConfigError as err:
            message = str(err)
            assert "privacy" in message and "\n" not in message.strip(), f"refusal is not one line: {message}"
            continue
        record = engine.run_round(1)
        assert record["status"] == "aggregated", f"unit {unit}: {record['status']} {record['rejected']}"
        assert record[figure] > 0, f"DP of unit {unit} ran without spending epsilon"


def check_export(case: Case) -> None:
    import pytest

    from fedlora.engine.evaluation import evaluate_state_load
    from fedlora.session.export import export_adapter

    engine, bundle = case.engine_and_model("export")
    if engine.sim.client_models is not None:
        pytest.skip(f"{case.strategy}: each client has its own model (exported per architecture, personal/)")
    engine.run_round(1)
    sim = engine.sim
    folder = engine.run_dir / "global"
    state = export_adapter(folder, case.config(), sim, bundle)
    evaluate_state_load(sim, state)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    model = sim.adapters.model
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits.double()
        theirs = exported_logits(folder, bundle.folder, ids)
    error = float((ours - theirs).norm() / ours.norm())
    assert error < 1e-5, f"the export's logits differ by {error:.2e} (relative)"


def exported_logits(folder: Path, base: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the exported global model, loaded the way a user would: PEFT on the base, or transformers."""
    from transformers import AutoModelForCausalLM

    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(folder)).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model(input_ids=ids).logits.double()


#: every check, by name (tests/conformance runs each on each registered strategy)
CHECKS: dict[str, Callable[[Case], None]] = {
    "round": check_round,
    "state": check_state,
    "resume": check_resume,
    "flower": check_flower,
    "wire": check_wire,
    "batched": check_batched,
    "privacy": check_privacy,
    "secure": check_secure,
    "export": check_export,
}


def check_strategy(
    strategy: str, workdir: Path, checks: list[str] | None = None, extra: dict[str, object] | None = None
) -> None:
    """Run the conformance checks (default: all) on the registered ``strategy`` in ``workdir``; raises
    ``AssertionError`` naming the check and what broke."""
    for name in checks or list(CHECKS):
        try:
            CHECKS[name](Case(strategy, workdir / name, extra))
        except AssertionError as err:
            raise AssertionError(f"{strategy}: conformance check '{name}': {err}") from None
