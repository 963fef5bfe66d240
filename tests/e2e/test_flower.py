"""Flower: the same strategies on Flower's simulation runtime and on a real SuperLink with SuperNodes."""

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import assert_rel_close, tiny_overrides
from fedlora import load_config
from fedlora.engine.flower.deploy import LoopbackDeployment, free_port, write_app
from fedlora.runner import run_experiment

TWO_RANKS = {
    "strategy.name": "flexlora",
    "resources.distribution": "custom",
    "resources.rank_types": "[2, 4]",
    "resources.shares": "[1, 1]",
}


def test_flower_simulation_reaches_the_embedded_engines_adapter(tmp_path: Path) -> None:
    extra = {**TWO_RANKS, "federation.clients_per_round": 3}
    run_experiment(
        load_config(None, tiny_overrides(tmp_path, **extra)), tmp_path / "embedded", show_progress=False
    )
    flower = load_config(None, tiny_overrides(tmp_path, **extra, engine="flower-sim"))
    run_experiment(flower, tmp_path / "flower", show_progress=False)
    a = load_file(str(tmp_path / "embedded" / "global" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "flower" / "global" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert_rel_close(a[k], b[k], 1e-5)
    ea, eb = (
        [json.loads(line)["eval_loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("embedded", "flower")
    )
    assert ea == pytest.approx(eb, rel=1e-6)


def test_deployment_superlink_and_two_supernodes_on_loopback(tmp_path: Path) -> None:
    overrides = tiny_overrides(
        tmp_path,
        **{
            **TWO_RANKS,
            "federation.num_clients": 2,
            "data.tasks": "[gcd, lcm]",
            "federation.clients_per_round": 2,
        },
    )
    cfg = load_config(None, overrides)
    run_dir = tmp_path / "run"
    link = free_port()
    app = write_app(tmp_path / "app", cfg, run_dir, address=f"127.0.0.1:{link}")
    deployment = LoopbackDeployment(
        app,
        # each node's own rank budget, reported through the QUERY message; then three bad nodes (a partition
        # that does not exist, none at all, one already held): refused and logged, the run goes on
        [
            "partition-id=0 num-partitions=2 rank-budget=4",
            "partition-id=1 num-partitions=2 rank-budget=2",
            "partition-id=7 num-partitions=2",
            "num-partitions=2",
            "partition-id=1 num-partitions=2",
        ],
        link,
        tmp_path,
    )
    try:
        deployment.start()
        result = deployment.run(timeout_s=600)
        assert result.returncode == 0 and "finished:completed" in result.stderr, result.stderr[-3000:]
        assert (run_dir / "global" / "adapter_model.safetensors").exists(), (
            result.stdout[-3000:] + result.stderr[-3000:]
        )
        refusals = result.stdout
        assert refusals.count("refused") >= 2, refusals[-3000:]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [1, 2] and all(r["num_clients"] == 2 for r in records)
        ranks = {c["client"]: c["rank"] for c in records[0]["clients"]}
        assert ranks == {0: "r4", 1: "r2"}  # the budgets the nodes reported, not the config's assignment
        assert records[-1]["eval_loss"] < records[0]["eval_loss"] + 1.0
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            json.loads((run_dir / "run.json").read_text())["base_model"]
        )
        PeftModel.from_pretrained(base, str(run_dir / "global"))  # a plain PEFT adapter
    finally:
        deployment.stop()
    for proc in deployment.started:  # nothing of what this test started is left
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)


def test_tls_deployment_with_supernode_authentication(tmp_path: Path) -> None:
    """TLS SuperLink with SuperNode authentication on loopback: the two registered nodes run 2 rounds; a
    third node, whose key was never registered, is refused (and never gets to claim a partition)."""
    from fedlora.engine.flower.tls import make_credentials

    overrides = tiny_overrides(
        tmp_path,
        **{"federation.num_clients": 2, "data.tasks": "[gcd, lcm]", "federation.clients_per_round": 2},
    )
    cfg = load_config(None, overrides)
    credentials = make_credentials(tmp_path / "tls", nodes=4)
    run_dir = tmp_path / "run"
    link = free_port()
    keys = {i: credentials.node_public_key(i).read_text().strip() for i in (0, 1)}  # partition i <- key i
    app = write_app(
        tmp_path / "app",
        cfg,
        run_dir,
        address=f"127.0.0.1:{link}",
        root_certificates=credentials.ca_cert,
        node_keys=keys,
    )
    nodes = [
        "partition-id=0 num-partitions=2",
        "partition-id=1 num-partitions=2",
        "partition-id=0 num-partitions=2",
        "partition-id=1 num-partitions=2",  # a registered key (3), but not the one bound to partition 1
    ]
    deployment = LoopbackDeployment(app, nodes, link, tmp_path, credentials=credentials, registered=[0, 1, 3])
    try:
        deployment.start()
        result = deployment.run(timeout_s=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (run_dir / "global" / "adapter_model.safetensors").exists(), (
            result.stdout[-3000:] + result.stderr[-3000:] + (tmp_path / "superlink.log").read_text()[-3000:]
        )
        # node 3 was refused, whichever of the two claims of partition 1 came first
        assert "refused" in result.stdout, result.stdout[-3000:]
        # the same app again: its run folder already holds a run, so the ServerApp fails, and that is an exit 1
        again = deployment.run(timeout_s=600)
        assert again.returncode == 1 and "finished:failed" in again.stderr, again.stderr[-2000:]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [1, 2] and all(r["num_clients"] == 2 for r in records)
        intruder = (tmp_path / "supernode2.log").read_text()
        # the SuperLink refuses to activate a node whose public key is not registered (Flower exit code 305)
        assert "Failed to activate SuperNode" in intruder, intruder[-2000:]
        for i in (0, 1):  # the registered ones, same CA and TLS, were activated
            assert "Failed to activate SuperNode" not in (tmp_path / f"supernode{i}.log").read_text()
    finally:
        deployment.stop()


def test_the_app_exposes_each_config_field_as_a_run_config_key(tmp_path: Path) -> None:
    import tomllib

    from fedlora.config.loader import ConfigError
    from fedlora.engine.flower import config_from_run_config

    cfg = load_config(None, tiny_overrides(tmp_path))
    app = write_app(tmp_path / "app", cfg, tmp_path / "run")
    keys = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert (
        keys["federation.rounds"] == 2
        and keys["client.lr"] == cfg.client.lr
        and keys["model.name"] == "tiny-llama"
    )
    assert config_from_run_config(keys) == cfg  # unchanged keys give back the config
    changed = config_from_run_config({**keys, "federation.rounds": 7, "client.lr": 0.01})
    assert changed.federation.rounds == 7 and changed.client.lr == 0.01 and changed.model == cfg.model
    with pytest.raises(ConfigError, match="'federation.roundz' is not a field"):
        config_from_run_config({**keys, "federation.roundz": 3})


def flower_sim_command(tmp_path: Path, rounds: int) -> list[str]:
    """``fedlora run`` of a tiny two-client experiment on flower-sim into ``tmp_path/r``."""
    import sys

    overrides = tiny_overrides(tmp_path, **{"federation.rounds": rounds, "data.tasks": "[gcd, lcm]"})
    return [
        sys.executable,
        "-m",
        "fedlora",
        "run",
        *overrides,
        "engine=flower-sim",
        "--output",
        str(tmp_path / "r"),
    ]


def test_a_flower_simulation_keeps_the_console_quiet(tmp_path: Path) -> None:
    """Flower's INFO/DEBUG lines and the clients' library warnings stay out of the console by default."""
    import subprocess

    command = flower_sim_command(tmp_path, rounds=1) + ["--no-progress"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "round 1/1: train" in output
    assert "INFO" not in output and "DEBUG" not in output and "FutureWarning" not in output


def test_flower_sim_refuses_a_disk_too_full_for_ray(tmp_path: Path, monkeypatch) -> None:
    """Above Ray's disk limit a simulation would hang without an error: it stops before starting, saying so."""
    import errno
    import shutil
    from collections import namedtuple

    from fedlora.engine.flower import check_ray_disk

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(100 * 2**30, 97 * 2**30, 3 * 2**30))
    with pytest.raises(
        OSError, match=r"97.0% full, above Ray's limit of 95%.*free at least 2.0 GiB"
    ) as caught:
        check_ray_disk(str(tmp_path))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path)
    monkeypatch.setenv("RAY_local_fs_capacity_threshold", "0.99")  # Ray's own override is honoured
    check_ray_disk(str(tmp_path))
    monkeypatch.delenv("RAY_local_fs_capacity_threshold")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(100 * 2**30, 90 * 2**30, 10 * 2**30))
    check_ray_disk(str(tmp_path))


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def listening(pid: int) -> list[str]:
    """The listening TCP sockets (hex address:port) in ``pid``'s network namespace."""
    rows = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                rows.append(fields[1])
    return rows


def test_a_flower_simulation_opens_no_port_to_the_network(tmp_path: Path) -> None:
    """Ray's GCS, raylet and workers bind every interface; the simulation runs them in a network namespace of
    their own whose only interface is loopback, so none of their ports exists on this machine's network."""
    import subprocess
    import time

    from fedlora.engine.flower.isolation import private_network_available

    if not private_network_available():
        pytest.skip("this kernel allows no private network namespace (no root, user namespaces off)")
    command = flower_sim_command(tmp_path, rounds=2)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    own = os.readlink("/proc/self/ns/net")
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline and not seen:
            for pid in descendants(proc.pid):
                try:
                    if b"gcs_server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        time.sleep(2.0)  # the raylet and workers start next
                        seen = {p: os.readlink(f"/proc/{p}/ns/net") for p in descendants(proc.pid)}
                        seen = {
                            p: ns
                            for p, ns in seen.items()
                            if b"ray" in Path(f"/proc/{p}/cmdline").read_bytes()
                        }
                        break
                except OSError:
                    continue
            time.sleep(0.2)
        assert seen, "no Ray process was seen"
        assert own not in set(seen.values())  # not one of them shares this machine's network
        pid = next(iter(seen))
        interfaces = [
            line.split(":")[0].strip() for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
        ]
        assert interfaces == ["lo"]
        assert listening(pid)  # Ray does listen, inside its namespace
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [
        json.loads(line)["round"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2]


def test_flower_sim_client_resources_from_the_config(tmp_path: Path, monkeypatch) -> None:
    """compute.flower_client_cpus / flower_client_gpus reach Ray as Flower's client-resources (FlowerTune's
    num-cpus / num-gpus); what the machine cannot give (Ray would wait forever) is refused before Ray starts."""
    import flwr.simulation
    import torch

    from fedlora.engine.flower.simulation import client_resources, run_flower_simulation
    from fedlora.errors import ConfigError

    def cfg(**compute: object):
        return load_config(
            None, [*tiny_overrides(tmp_path), *(f"compute.{k}={v}" for k, v in compute.items())]
        )

    monkeypatch.setattr("fedlora.compute.usable_cores", lambda: 2)
    assert client_resources(cfg(device="cpu"), 4) == {"num_cpus": 1, "num_gpus": 0.0}
    assert client_resources(cfg(device="cpu", flower_client_cpus=2), 4) == {"num_cpus": 2, "num_gpus": 0.0}
    with pytest.raises(ConfigError, match=r"flower_client_cpus: 6 CPUs per client.*use 2.*at most 2"):
        client_resources(cfg(device="cpu", flower_client_cpus=6), 4)
    with pytest.raises(
        ConfigError, match=r"flower_client_gpus: 1 GPUs per client on a run whose device is cpu"
    ):
        client_resources(cfg(device="cpu", flower_client_gpus=1.0), 4)
    with pytest.raises(ConfigError, match="flower_client_cpus must be 'auto' or at least 1"):
        cfg(flower_client_cpus=0)
    monkeypatch.setattr("fedlora.compute.resolve_device", lambda name: torch.device("cuda:0"))  # a GPU run
    assert client_resources(cfg(), 4) == {"num_cpus": 1, "num_gpus": 0.25}  # the round's clients share it
    assert client_resources(cfg(flower_client_gpus=1.0), 4)["num_gpus"] == 1.0
    monkeypatch.undo()
    seen: dict[str, object] = {}
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: seen.update(kw))
    with pytest.raises(RuntimeError, match="ended without finishing"):
        run_flower_simulation(cfg(device="cpu", flower_client_cpus=2), tmp_path / "r", 4, None, None)
    assert seen["backend_config"]["client_resources"] == {"num_cpus": 2, "num_gpus": 0.0}  # type: ignore[index]


def test_secure_aggregation_on_a_deployment(tmp_path: Path) -> None:
    """SecAgg+ between a SuperLink's ServerApp and three SuperNodes (query routing: each node holds its own
    partition): the round aggregates every client, and the adapter is the embedded engine's within SecAgg+'s
    quantisation (relative error of the effective weights)."""
    from fedlora.testing.conformance import relative_error

    extra = {
        "federation.num_clients": 3,
        "data.tasks": "[gcd, lcm, chain_sum]",
        "federation.clients_per_round": 3,
        "federation.rounds": 1,  # each SecAgg+ stage starts a ClientApp process on each node: ~2 min a round
    }
    run_experiment(
        load_config(None, tiny_overrides(tmp_path, **extra)), tmp_path / "embedded", show_progress=False
    )
    cfg = load_config(None, tiny_overrides(tmp_path, **extra, **{"federation.secure_aggregation": "true"}))
    run_dir = tmp_path / "run"
    link = free_port()
    app = write_app(tmp_path / "app", cfg, run_dir, address=f"127.0.0.1:{link}")
    nodes = [f"partition-id={i} num-partitions=3" for i in range(3)]
    deployment = LoopbackDeployment(app, nodes, link, tmp_path)
    try:
        deployment.start()
        result = deployment.run(timeout_s=600)
        assert result.returncode == 0 and "finished:completed" in result.stderr, result.stderr[-3000:]
    finally:
        deployment.stop()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1]
    assert all(r["status"] == "aggregated" and r["num_clients"] == 3 for r in records)
    assert all(c["secagg_bytes_down"] > 0 for r in records for c in r["clients"])
    files = [tmp_path / d / "adapter_model.safetensors" for d in ("embedded/global", "run/global")]
    embedded, secure = (load_file(str(f)) for f in files)
    assert relative_error(secure, embedded) < 1e-3
