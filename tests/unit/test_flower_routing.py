"""How the Flower server finds a client's node: a query to every node (deployment) or the nodes as slots
(Flower's simulation, where asking every one of 10,000 virtual nodes does not finish)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_engine
from fedlora.config.loader import ConfigError
from fedlora.protocol import ClientInstruction, ClientReply, request_header


class RecordingGrid:
    """A Grid that keeps what it is sent (no node ever answers a query)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.sent: list[list[dict]] = []

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def push_messages(self, messages: list[dict]) -> list[str]:
        self.sent.append(list(messages))
        return [f"m{i}" for i in range(len(self.sent[-1]))]

    def pull_messages(self, ids: set[str]) -> list:
        return []


def test_assigned_routing_asks_no_node_and_names_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlora.engine.flower import FlowerTransport
    from fedlora.protocol import ASSIGNED_KEY

    monkeypatch.setattr("flwr.app.Message", lambda **fields: fields)  # outside a Flower run: a plain record
    engine = tiny_engine(tmp_path, **{"federation.client_timeout": 0.05})  # 4 clients; no node ever replies
    grid = RecordingGrid([907, 12, 5550, 31])
    transport = FlowerTransport(engine.sim, grid, wait_for_nodes_s=0, routing="assigned")
    assert grid.sent == []  # nothing before a round samples clients
    assert transport.slots == [12, 31, 907, 5550]  # a round's k-th client goes to the k-th
    payload = {"m.lora_A.weight": torch.zeros(2, 3)}
    transport.train_clients(1, {2: ClientInstruction(payload), 0: ClientInstruction(payload)})
    (messages,) = grid.sent
    assert [m["dst_node_id"] for m in messages] == [12, 31]
    assert [(m["content"]["meta"]["client"], m["content"]["meta"][ASSIGNED_KEY]) for m in messages] == [
        (2, True),
        (0, True),
    ]

    with pytest.raises(RuntimeError, match="more clients in a round than the simulation's 4 nodes"):
        transport.train_clients(2, {c: ClientInstruction(payload) for c in range(5)})
    with pytest.raises(ConfigError, match="1 nodes connected, the federation needs 2"):
        FlowerTransport(engine.sim, RecordingGrid([5]), wait_for_nodes_s=0, routing="assigned")

    query = RecordingGrid([907, 12, 5550, 31])
    with pytest.raises(ConfigError, match="none of the 4 nodes holds a usable partition"):
        FlowerTransport(engine.sim, query, wait_for_nodes_s=0)  # the query: one message per node
    assert [m["dst_node_id"] for m in query.sent[0]] == [907, 12, 5550, 31]
    with pytest.raises(ValueError, match="routing 'nearest'"):
        FlowerTransport(engine.sim, query, wait_for_nodes_s=0, routing="nearest")


def test_a_node_trains_the_named_client_only_when_it_is_a_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora import load_config
    from fedlora.engine.flower import client_app
    from fedlora.engine.flower.transport import to_arrays
    from fedlora.protocol import ASSIGNED_KEY

    for field in ("_task_id", "_run_id", "_node_id"):  # what a Flower runtime sets in its process
        monkeypatch.setattr(TaskIdentity, field, 1)
    trained: list[int] = []

    def train(server_round: int, client: int, instruction: ClientInstruction) -> ClientReply:
        trained.append(client)
        return ClientReply(client, instruction.payload, 3, {"train_loss": 1.0})

    node = SimpleNamespace(train=train, use_store=lambda folder: None)
    cfg = load_config(None, ["model.name=tiny-llama", f"output.dir={tmp_path}"])
    app = client_app(lambda spec: node, cfg)
    context = Context(
        run_id=1, node_id=77, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )

    def message(header: dict) -> Message:
        payload = to_arrays({"m.lora_A.weight": torch.ones(2, 3)})
        content = RecordDict({"payload": payload, "meta": ConfigRecord(header)})
        assert isinstance(content["payload"], ArrayRecord)
        return Message(content=content, dst_node_id=77, message_type="train")

    header = request_header(1, 2, ClientInstruction({}))
    with pytest.raises(Exception, match="a message for client 2 reached the node holding partition 0"):
        app(message(header), context)
    assert trained == []
    app(message({**header, ASSIGNED_KEY: True}), context)
    assert trained == [2]


def test_a_node_is_built_once_per_process_though_the_app_travels_by_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower's Ray backend cloudpickles the ClientApp for every message; the node cache must survive it (it
    did not: every message built a new node, data and model)."""
    import cloudpickle
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora import load_config
    from fedlora.engine.flower import client_app
    from fedlora.engine.flower.transport import to_arrays
    from fedlora.protocol import ASSIGNED_KEY

    for field in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    builds = tmp_path / "builds"  # a side effect that a by-value copy of this closure cannot hide
    builds.write_text("")

    def build(spec: object) -> SimpleNamespace:
        with builds.open("a") as f:
            f.write("built\n")
        train = lambda r, c, instruction: ClientReply(c, instruction.payload, 3, {})  # noqa: E731
        return SimpleNamespace(train=train, use_store=lambda folder: None)

    cfg = load_config(None, ["model.name=tiny-llama", f"output.dir={tmp_path}", "federation.seed=913"])
    app = client_app(build, cfg)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    header = {**request_header(1, 1, ClientInstruction({})), ASSIGNED_KEY: True}
    for _ in range(3):
        content = RecordDict({"payload": to_arrays({"w": torch.ones(2)}), "meta": ConfigRecord(header)})
        cloudpickle.loads(cloudpickle.dumps(app))(
            Message(content, dst_node_id=5, message_type="train"), context
        )
    assert builds.read_text().splitlines() == ["built"]


def test_flower_sim_refuses_rows_given_in_python(tmp_path: Path) -> None:
    """Flower's client processes build the data from the config: rows handed to ``fedlora.run`` would be
    silently replaced by the config's data source there (they were)."""
    import fedlora
    from conftest import tiny_overrides

    cfg = fedlora.load_config(None, tiny_overrides(tmp_path, engine="flower-sim"))
    rows = [
        {"instruction": f"add {i} and 1", "output": str(i + 1), "category": f"t{i % 2}"} for i in range(8)
    ]
    with pytest.raises(ConfigError, match="engine flower-sim: each Flower client process builds the data"):
        fedlora.run(cfg, tmp_path / "run", dataset=rows, show_progress=False)
    assert not (tmp_path / "run").exists()


def test_a_partition_claim_is_proven_only_by_the_key_bound_to_it(tmp_path) -> None:
    from fedlora.engine.flower.tls import make_credentials, sign_claim, verify_claim

    creds = make_credentials(tmp_path, nodes=2)
    key0, key1 = (creds.node_public_key(i).read_text() for i in (0, 1))
    signature = sign_claim(creds.node_key(0), "nonce-1", 0)
    assert verify_claim(key0, "nonce-1", 0, signature)
    assert not verify_claim(key1, "nonce-1", 0, signature)  # another node's key
    assert not verify_claim(key0, "nonce-1", 1, signature)  # another partition
    assert not verify_claim(key0, "nonce-2", 0, signature)  # a replayed answer to an earlier query
    assert not verify_claim(key0, "nonce-1", 0, "zz")
