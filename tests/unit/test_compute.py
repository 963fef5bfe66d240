"""compute: devices and precision, parallel worker processes, many clients in one pass.

Everything here runs on the CPU; the tests marked ``cuda`` also run on a CUDA device when torch sees one
(the GPU figures in benchmarks/gpu.md come from running this file there).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from conftest import assert_rel_close
from fedlora.compute import (
    BF16_UNITS_ENV,
    auto_workers,
    cpu_flags,
    has_bf16_matrix_units,
    resolve_device,
    resolve_precision,
    to_cpu,
)
from fedlora.errors import ConfigError
from fedlora.preflight import config_from_dict, load_config
from fedlora.runner import run
from fedlora.testing.conformance import method_figures, relative_error

CUDA = torch.cuda.is_available()


DATA = {"tasks": ["gcd", "lcm", "chain_sum", "basic_arithmetic"], "examples_per_task": 16}
if os.environ.get("FEDLORA_TEST_DATA_JSON"):  # a machine without reasoning-gym (the lent GPU): the same
    DATA = {"source": "json", "path": os.environ["FEDLORA_TEST_DATA_JSON"]}  # tasks, exported as JSONL


def tiny(tmp: Path, method: str = "fedit", **sections) -> dict:
    cfg = {
        "name": "compute",
        "model": {"name": "tiny-llama"},
        "data": dict(DATA),
        "federation": {"rounds": 2, "clients_per_round": 4},
        "client": {"local_steps": 3},
        "adapter": {"dropout": 0.0},
        "strategy": {"name": method},
        "output": {"plot": False, "root": str(tmp)},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def run_cfg(tmp: Path, name: str, cfg: dict, **options):
    return run(config_from_dict(cfg), tmp / name, show_progress=False, **options)


# --- devices -------------------------------------------------------------------------------------------
def test_auto_device_and_clear_error_for_absent_cuda():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda:0") if CUDA else torch.device("cpu"))
    if not CUDA:
        with pytest.raises(ConfigError, match=r"compute.device: 'cuda:1' asked for, but .* sees no CUDA GPU"):
            resolve_device("cuda:1")
    else:
        with pytest.raises(ConfigError, match="asked for, but torch sees"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_device_names_are_checked_in_the_config():
    with pytest.raises(ConfigError, match="compute.device"):
        load_config(None, ["compute.device=gpu"])
    with pytest.raises(ConfigError, match="compute.devices"):
        load_config(None, ["compute.devices=[cuda:0, tpu]"])
    with pytest.raises(ConfigError, match="compute.workers"):
        load_config(None, ["compute.workers=0"])


def test_run_asking_for_absent_cuda_fails_before_any_work(tmp_path):
    if CUDA:
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        run_cfg(tmp_path, "r", tiny(tmp_path, compute={"device": "cuda"}))
    assert not (tmp_path / "r").exists()


def test_auto_workers_rule():
    cpu = torch.device("cpu")
    assert auto_workers(1_000_000, 8, cpu) == 1  # tiny models stay in process
    assert auto_workers(135_000_000, 1, cpu) == 1  # one client per round: nothing to share
    assert 1 <= auto_workers(135_000_000, 8, cpu) <= (os.cpu_count() or 1)
    assert auto_workers(135_000_000, 8, torch.device("cuda:0")) == 1


def test_to_cpu_copies():
    x = torch.ones(2)
    out = to_cpu({"x": x})
    out["x"].add_(1)
    assert x.sum() == 2 and out["x"].device.type == "cpu"


# --- precision -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_float32_factors_close_to_fp32(tmp_path, precision):
    base = run_cfg(tmp_path, "fp32", tiny(tmp_path))
    mixed = run_cfg(tmp_path, precision, tiny(tmp_path, compute={"precision": precision}))
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in mixed.final_state.values())
    for a, b in zip(mixed.records, base.records, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) / b["train_loss"] < 1e-2
        assert abs(a["eval_loss"] - b["eval_loss"]) / b["eval_loss"] < 1e-2
    assert relative_error(mixed.final_state, base.final_state) < 5e-2


AMX_CPUINFO = (
    "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\nprocessor\t: 1\n"
)
AVX2_CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n"


def test_auto_precision_is_bf16_only_where_the_device_has_bf16_units(monkeypatch):
    """compute.precision: auto -> bf16 on a CPU with AMX-BF16 / AVX512-BF16 or a GPU with native bf16, fp32
    elsewhere (bf16 in software is ~35x slower than fp32); explicit values pass through untouched."""
    assert cpu_flags(AMX_CPUINFO) >= {"amx_bf16", "avx512_bf16"} and "amx_bf16" not in cpu_flags(AVX2_CPUINFO)
    assert cpu_flags("no flags line") == frozenset()
    monkeypatch.delenv(BF16_UNITS_ENV)  # the detection itself, on faked /proc/cpuinfo text
    for text, expected in ((AMX_CPUINFO, "bf16"), (AVX2_CPUINFO, "fp32")):
        monkeypatch.setattr("fedlora.compute.cpu_flags", lambda text=text: cpu_flags(text))
        assert has_bf16_matrix_units(torch.device("cpu")) == (expected == "bf16")
        assert resolve_precision("auto", "cpu") == expected
        for explicit in ("fp32", "bf16", "fp16"):
            assert resolve_precision(explicit, "cpu") == explicit
    assert not has_bf16_matrix_units(torch.device("meta"))  # MPS and other devices: fp32
    monkeypatch.setattr("fedlora.compute.cpu_flags", lambda: cpu_flags(AVX2_CPUINFO))
    monkeypatch.setenv(BF16_UNITS_ENV, "1")  # the override wins over the detection
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setenv(BF16_UNITS_ENV, "0")
    assert resolve_precision("auto", "cpu") == "fp32"


def test_auto_precision_is_resolved_into_the_run_and_kept_on_resume(tmp_path, monkeypatch):
    """The value auto chose is in config.yaml, run.json and the run's first line; a resume on a machine that
    would choose otherwise goes on at the run's own precision."""
    from rich.console import Console

    monkeypatch.setenv(BF16_UNITS_ENV, "1")
    cfg = tiny(tmp_path, federation={"rounds": 2, "clients_per_round": 2}, client={"local_steps": 1})
    assert config_from_dict(cfg).compute.precision == "auto"
    console = Console(record=True, width=400)
    first = run(
        config_from_dict({**cfg, "federation": {"rounds": 1, "clients_per_round": 2}}),
        tmp_path / "r",
        show_progress=False,
        console=console,
    )
    assert "precision bf16" in console.export_text()
    assert yaml.safe_load((first.run_dir / "config.yaml").read_text())["compute"]["precision"] == "bf16"
    assert json.loads((first.run_dir / "run.json").read_text())["precision"] == "bf16"
    monkeypatch.setenv(BF16_UNITS_ENV, "0")  # "another machine": auto would now give fp32
    resumed = run(config_from_dict(cfg), tmp_path / "r", resume=True, show_progress=False)
    assert [r["round"] for r in resumed.records] == [1, 2]
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["compute"]["precision"] == "bf16"
    fresh = run(config_from_dict(cfg), tmp_path / "s", show_progress=False)
    assert json.loads((fresh.run_dir / "run.json").read_text())["precision"] == "fp32"


def test_a_bf16_base_copy_trains_like_bf16_autocast(tmp_path):
    """compute.base_dtype bf16: the frozen linear weights are bf16 once (the embeddings and the output layer
    stay float32; LoRA factors float32), and training follows bf16 autocast closely."""
    from fedlora.models.loading import load_base_model

    cfg = config_from_dict(tiny(tmp_path, compute={"precision": "bf16", "base_dtype": "bf16"}))
    model = load_base_model(cfg.model, compute=cfg.compute).model
    head = model.get_output_embeddings()
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert (
        model.get_input_embeddings().weight.dtype == head.weight.dtype == torch.float32
    )  # full-precision logits
    autocast = run_cfg(tmp_path, "autocast", tiny(tmp_path, compute={"precision": "bf16"}))
    copied = run_cfg(tmp_path, "copy", cfg.model_dump(mode="json"))
    assert all(v.dtype == torch.float32 for v in copied.final_state.values())
    for a, b in zip(copied.records, autocast.records, strict=True):
        assert abs(a["eval_loss"] - b["eval_loss"]) / b["eval_loss"] < 1e-2
    assert relative_error(copied.final_state, autocast.final_state) < 5e-2


def test_a_bf16_base_copy_is_refused_where_it_would_be_wrong(tmp_path):
    with pytest.raises(
        ConfigError, match="base_dtype bf16 runs under autocast in that dtype: set precision: bf16"
    ):
        config_from_dict(tiny(tmp_path, compute={"base_dtype": "bf16", "precision": "fp32"}))
    # precision: auto follows the base's dtype
    assert config_from_dict(tiny(tmp_path, compute={"base_dtype": "bf16"})).compute.precision == "bf16"
    bf16 = {"precision": "bf16", "base_dtype": "bf16"}
    with pytest.raises(ConfigError, match="compute.base_dtype.*flora.*would round"):
        load_config(None, ["strategy.name=flora", "compute.precision=bf16", "compute.base_dtype=bf16"])
    with pytest.raises(ConfigError, match="compute.base_dtype applies to a full-precision base"):
        config_from_dict(tiny(tmp_path, compute=bf16, model={"name": "tiny-llama", "quantization": 4}))


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    base = run_cfg(tmp_path, "plain", tiny(tmp_path))
    ckpt = run_cfg(tmp_path, "ckpt", tiny(tmp_path, compute={"gradient_checkpointing": True}))
    assert relative_error(ckpt.final_state, base.final_state) < 1e-5


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["fedit", "flexlora", "fedmezo"])
def test_cuda_run_agrees_with_cpu_run(tmp_path, strategy):
    cpu = run_cfg(tmp_path, "cpu", tiny(tmp_path, strategy, compute={"device": "cpu"}))
    gpu = run_cfg(
        tmp_path, "gpu", tiny(tmp_path, strategy, compute={"device": "cuda", "server_device": "auto"})
    )
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in gpu.final_state.values())
    assert relative_error(gpu.final_state, cpu.final_state) < 1e-3
    for a, b in zip(gpu.records, cpu.records, strict=True):
        assert abs(a["eval_loss"] - b["eval_loss"]) / b["eval_loss"] < 1e-4


# --- workers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("strategy", "sections"),
    [
        (
            "flexlora",
            {
                "resources": {"distribution": "custom", "rank_types": [2, 4], "shares": [1, 1]},
                "faults": {"dropout": 0.25},
            },
        ),
        ("ffa-lora", {"privacy": {"enabled": True, "noise_multiplier": 0.5}}),
        ("fedmezo", {"strategy": {"name": "fedmezo", "options": {"upload": "seeds"}}}),
    ],
    ids=["flexlora-ranks-faults", "ffa-lora-dp", "fedmezo-seeds"],
)
def test_two_workers_end_with_the_same_adapter_bit_for_bit(tmp_path, strategy, sections):
    one = run_cfg(tmp_path, "one", tiny(tmp_path, strategy, compute={"workers": 1}, **sections))
    two = run_cfg(tmp_path, "two", tiny(tmp_path, strategy, compute={"workers": 2}, **sections))
    assert one.final_state.keys() == two.final_state.keys()
    assert all(torch.equal(one.final_state[k], two.final_state[k]) for k in one.final_state)
    # the clients' entries differ by the process that trained them (worker, its memory)
    figures = [
        {k: v for k, v in method_figures(r).items() if k != "clients"} for r in (*one.records, *two.records)
    ]
    assert figures[: len(one.records)] == figures[len(one.records) :]
    # the run's peak memory covers the worker processes that trained, not only the server's
    for record in two.records:
        peaks = [c["peak_rss_mb"] for c in record["clients"] if "peak_rss_mb" in c]
        # each worker reports its own peak; DP-SGD replies (ffa-lora-dp) release none (test_trust)
        assert len(peaks) == (0 if "privacy" in sections else len(record["clients"]))
        assert record["peak_rss_mb"] >= max(peaks, default=0.0)


def test_personal_state_and_resume_with_workers(tmp_path):
    sections = {
        "model": {"name": "tiny-llama", "variants": [{"num_layers": 2}, {"num_layers": 1}]},
        "strategy": {"name": "pfedlora"},
    }
    whole = run_cfg(tmp_path, "whole", tiny(tmp_path, "pfedlora", compute={"workers": 1}, **sections))
    cfg = tiny(tmp_path, "pfedlora", compute={"workers": 2}, **sections)
    cfg["federation"]["rounds"] = 1
    run_cfg(tmp_path, "parts", cfg)
    cfg["federation"]["rounds"] = 2
    resumed = run_cfg(tmp_path, "parts", cfg, resume=True)
    assert all(torch.equal(whole.final_state[k], resumed.final_state[k]) for k in whole.final_state)
    assert resumed.records[-1]["eval_loss"] == whole.records[-1]["eval_loss"]


WORKER_FAULT_PLUGIN = """
import os
import signal
from fedlora import ClientHooks, register_client_hooks, register_strategy
from fedlora.strategies.fedavg import FedIT


@register_client_hooks
class FaultInWorker(ClientHooks):
    kind = "fault-in-worker"
    client: int
    main_pid: int

    def before_training(self, ctx):
        if ctx.client_id == self.client and ctx.server_round == 1 and os.getpid() != self.main_pid:
            FAULT
        return {}


@register_strategy
class FedITWithAFault(FedIT):
    name = "fedit-worker-fault"

    def client_hooks(self, state):
        return [FaultInWorker(client=2, main_pid=os.getpid())]
"""


def first_round_without_client_2(tmp_path, monkeypatch, fault: str, **sections) -> dict:
    """A 2-round run on two workers whose client 2 meets ``fault`` (a Python statement) in its round-1 worker:
    round 1 goes on without it, round 2 has all four clients (a fresh worker took the faulty one's place).
    Returns round 1's rejection of client 2."""
    (tmp_path / "fault_plugin.py").write_text(textwrap.dedent(WORKER_FAULT_PLUGIN).replace("FAULT", fault))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cfg = tiny(tmp_path, "fedit-worker-fault", compute={"workers": 2}, **sections)
    cfg["plugins"] = ["fault_plugin"]
    first, second = run_cfg(tmp_path, "r", cfg).records
    assert [r["client"] for r in first["rejected"]] == [2]
    assert first["status"] == "aggregated" and first["num_clients"] == 3
    assert second["num_clients"] == 4 and not second["rejected"]
    return first["rejected"][0]


def test_a_worker_crash_is_a_dropped_client_not_a_dead_run(tmp_path, monkeypatch):
    rejection = first_round_without_client_2(tmp_path, monkeypatch, "os._exit(9)")  # no exception, no reply
    assert "worker crashed" in rejection["reason"]


def test_a_stopped_worker_is_a_timed_out_client_not_a_hung_run(tmp_path, monkeypatch):
    """SIGSTOP one of two workers mid-round: past federation.client_timeout its client is left out with reason
    timeout, the stopped process is killed and replaced, and the run finishes (it used to wait forever)."""
    stop = "os.kill(os.getpid(), signal.SIGSTOP)"  # stopped mid-round: alive, silent, forever
    rejection = first_round_without_client_2(tmp_path, monkeypatch, stop, federation={"client_timeout": 4.0})
    assert rejection["reason"].startswith("timeout: no reply within 4 s")


def test_the_client_deadline_rule():
    from fedlora.config.schema import FederationConfig
    from fedlora.engine.deadline import ClientDeadline

    auto = ClientDeadline.of(FederationConfig(client_timeout_floor=30.0))
    assert auto.seconds() == 30.0  # no client time yet: the floor
    for seconds in (1.0, 2.0, 9.0):
        auto.record(seconds)
    assert auto.seconds() == 30.0  # 10 x median 2 s is below the floor
    for _ in range(5):
        auto.record(6.0)
    assert auto.seconds() == 60.0  # 10 x the median (6 s)
    assert ClientDeadline.of(FederationConfig(client_timeout=7.5)).seconds() == 7.5
    with pytest.raises(ValueError, match="client_timeout"):
        FederationConfig(client_timeout=0.0)


STOP_PLUGIN = """
import os
import signal
import time

from fedlora import ClientHooks, register_client_hooks, register_strategy
from fedlora.strategies.fedavg import FedIT


@register_client_hooks
class StopTheGroupMidRound(ClientHooks):
    kind = "stop-the-group-mid-round"

    def before_training(self, ctx):
        marker = os.environ.get("FEDLORA_TEST_STOP_MARKER")
        if ctx.server_round == 2 and marker:
            try:  # the first client of round 2 to get here, in whichever worker
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return {}
            time.sleep(3)  # the round's other clients finish on the other worker: this one is the last
            os.killpg(0, signal.SIGTERM)  # what `kill -- -<group>` (or Ctrl-C's SIGINT) does
        return {}


@register_strategy
class FedITStoppedMidRound(FedIT):
    name = "fedit-stopped"

    def client_hooks(self, state):
        return [StopTheGroupMidRound()]
"""


def test_a_stop_sent_to_the_whole_process_group_abandons_the_round(tmp_path, monkeypatch):
    """`kill -- -<group>` reaches the workers too. It used to kill the worker of the round's last client,
    which the parent took for a crash: the round was written with 3 of its 4 clients, then the run stopped
    (seen in two 30-round experiment runs). Now no round is written short of a client, and the resumed run
    equals an uninterrupted one bit for bit."""
    (tmp_path / "stop_plugin.py").write_text(textwrap.dedent(STOP_PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cfg = tiny(tmp_path, "fedit-stopped", compute={"workers": 2})
    cfg["plugins"] = ["stop_plugin"]
    cfg["federation"]["rounds"] = 3
    config_file = tmp_path / "stop.yaml"
    config_file.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "stopped"
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedlora.cli",
            "run",
            str(config_file),
            "--output",
            str(run_dir),
            "--no-progress",
        ],
        env={**os.environ, "FEDLORA_TEST_STOP_MARKER": str(tmp_path / "stop-sent")},
        start_new_session=True,  # its own process group, which the plugin signals
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 128 + signal.SIGTERM, process.stderr[-2000:]
    assert "worker crashed" not in process.stderr and "Traceback" not in process.stderr
    # round 2 is abandoned, or complete if its last reply came in before the stop was seen; never short
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] in ([1], [1, 2])
    assert all(r["num_clients"] == 4 and not r["rejected"] for r in records), records
    resumed = run_cfg(tmp_path, "stopped", cfg, resume=True)
    whole = run_cfg(tmp_path, "whole", cfg)
    assert [r["num_clients"] for r in resumed.records] == [4, 4, 4]
    assert all(torch.equal(whole.final_state[k], resumed.final_state[k]) for k in whole.final_state)


# --- many clients in one pass --------------------------------------------------------------------------
HETEROGENEOUS = {
    "resources": {"distribution": "custom", "rank_types": [2, 4, 6, 8], "shares": [1, 1, 1, 1]},
    "adapter": {"dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]},
}


@pytest.mark.parametrize(
    ("strategy", "sections"),
    [
        ("fedit", {}),
        ("flexlora", HETEROGENEOUS),
        ("flexlora", {**HETEROGENEOUS, "adapter": {**HETEROGENEOUS["adapter"], "use_rslora": True}}),
        ("ffa-lora", {}),
        ("fedavg", {"client": {"momentum": 0.9}}),
    ],
    ids=["fedit", "flexlora-4-ranks", "flexlora-4-ranks-rslora", "ffa-lora-frozen-a", "fedavg-sgd-momentum"],
)
def test_batched_clients_equal_per_client_training(tmp_path, strategy, sections):
    devices = ["cuda"] if CUDA else []
    for device in ["cpu", *devices]:
        per = run_cfg(
            tmp_path, f"per-{device}", tiny(tmp_path, strategy, compute={"device": device}, **sections)
        )
        together = tiny(tmp_path, strategy, compute={"device": device, "batch_clients": True}, **sections)
        batched = run_cfg(tmp_path, f"batched-{device}", together)
        for a, b in zip(batched.records, per.records, strict=True):
            assert [c["client"] for c in a["clients"]] == [c["client"] for c in b["clients"]]
            assert all(c["batched_clients"] == 4 for c in a["clients"])
            losses_a = torch.tensor([c["train_loss"] for c in a["clients"]], dtype=torch.float64)
            losses_b = torch.tensor([c["train_loss"] for c in b["clients"]], dtype=torch.float64)
            assert_rel_close(losses_a, losses_b, 1e-5)
            assert a["bytes_up"] == b["bytes_up"]
            assert [c["rank"] for c in a["clients"]] == [c["rank"] for c in b["clients"]]
        assert relative_error(batched.final_state, per.final_state) < 1e-4


def test_batched_clients_fall_back_with_a_note_where_they_cannot_serve(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    cfg = tiny(tmp_path, "fedprox", compute={"batch_clients": True})
    batched = run_cfg(tmp_path, "b", cfg)
    per = run_cfg(tmp_path, "p", tiny(tmp_path, "fedprox"))
    notes = [r.message for r in caplog.records if "compute.batch_clients" in r.message]
    assert len(notes) == 1 and "fedprox" in notes[0] and "one at a time" in notes[0]
    assert all(torch.equal(batched.final_state[k], per.final_state[k]) for k in per.final_state)
