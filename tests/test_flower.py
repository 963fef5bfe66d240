"""Flower: the same strategies on Flower's simulation runtime and on a real SuperLink with SuperNodes."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from fedlora.config import load_config
from fedlora.engine.flower_deploy import write_app
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
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ea, eb = (
        [json.loads(line)["eval_loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("embedded", "flower")
    )
    assert ea == pytest.approx(eb, rel=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deployment_superlink_and_two_supernodes_on_loopback(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "HF_HUB_OFFLINE": "1",
    }
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
    env["FLWR_HOME"] = str(app / "flwr-home")
    started: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> subprocess.Popen:
        with open(tmp_path / log, "w") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                args, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        started.append(proc)
        return proc

    try:
        start(
            [
                "flower-superlink",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link),
                "--disable-runtime-dependency-installation",
            ],
            "superlink.log",
        )
        time.sleep(5)
        budgets = {0: 4, 1: 2}  # each node's own rank budget, reported through the QUERY message
        for client, budget in budgets.items():
            start(
                [
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={client} num-partitions=2 rank-budget={budget}",
                ],
                f"supernode{client}.log",
            )
        result = subprocess.run(
            ["flwr", "run", str(app), "fedlora", "--stream"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert (run_dir / "global" / "adapter_model.safetensors").exists(), (
            result.stdout[-3000:] + result.stderr[-3000:]
        )
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
        stop_groups(started)
    for proc in started:  # nothing of what this test started is left
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)


def stop_groups(started: list[subprocess.Popen]) -> None:
    """Stop exactly the process groups this test started (their SuperExec and app processes too)."""
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + 15
    for proc in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.time()))
    for proc in started:
        while time.time() < deadline + 15:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
