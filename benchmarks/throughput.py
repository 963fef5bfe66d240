"""Question: how many rounds per hour does the default SmolLM2 experiment get from this machine, per way of
running its clients (compute.workers, compute.batch_clients, compute.precision), at the same result?

The built-in default experiment (FedIT, SmolLM2-135M-Instruct, LoRA r=8 on attention, reasoning-gym tasks,
4 local steps of batch 4) for ``--rounds`` rounds, held-out evaluation only after the last round. Each variant
runs in its own process (clean peak memory). Seconds per round are the engine's own ``seconds`` of the
rounds before the last (training + aggregation; no evaluation, no start-up); the held-out loss is that of
the last round's evaluation, the same examples for every variant. Anchor: ``per-client fp32`` with one
thread, today's path. Peak memory: the main process's peak RSS, each worker's (``RUSAGE_CHILDREN``), and
the GPU's peak allocation when there is one.

    python benchmarks/throughput.py [--rounds 3] [--clients 4] [--variants a,b] [-o key=value ...]

On a GPU machine: ``--device cuda --clients 8 --variants per-client,batched,per-client-bf16,batched-bf16``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from children import report, run_self

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

#: variant -> config overrides
VARIANTS: dict[str, list[str]] = {
    "per-client": ["compute.workers=1", "client.num_threads=1", "compute.precision=fp32"],
    "per-client-all-threads": ["compute.workers=1", f"client.num_threads={CORES}", "compute.precision=fp32"],
    "workers": [f"compute.workers={CORES}", "client.num_threads=1", "compute.precision=fp32"],
    "batched": ["compute.batch_clients=true", f"client.num_threads={CORES}", "compute.precision=fp32"],
    "default": [],  # the config's defaults: workers auto, precision auto (bf16 where the device has bf16 units)
    "per-client-bf16": ["compute.workers=1", "client.num_threads=1", "compute.precision=bf16"],
    "workers-bf16": [f"compute.workers={CORES}", "client.num_threads=1", "compute.precision=bf16"],
    "batched-bf16": ["compute.batch_clients=true", f"client.num_threads={CORES}", "compute.precision=bf16"],
}


def run_one(variant: str, rounds: int, clients: int, device: str, extra: list[str], folder: Path) -> dict:
    """One variant in this process; returns its figures."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from fedlora import load_config
    from fedlora.config.loader import builtin_config_path  # the demo experiment is the base
    from fedlora.runner import run

    overrides = [
        f"federation.rounds={rounds}",
        f"federation.clients_per_round={clients}",
        f"eval.every={rounds}",
        f"compute.device={device}",
        "output.plot=false",
        *VARIANTS[variant],
        *extra,
    ]
    cfg = load_config(builtin_config_path(), overrides)
    started = time.perf_counter()
    result = run(cfg, folder, show_progress=False)
    wall = time.perf_counter() - started
    timed = result.records[:-1] or result.records
    out = {
        "variant": variant,
        "s_per_round": sum(r["seconds"] for r in timed) / len(timed),
        "eval_loss": result.records[-1].get("eval_loss"),
        "train_loss_round1": result.records[0]["train_loss"],
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    if torch.cuda.is_available():
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="clients per round")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", default="per-client,workers,batched,per-client-bf16,batched-bf16")
    parser.add_argument("-o", "--override", action="append", default=[], help="extra config override")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            figures = run_one(
                args.one, args.rounds, args.clients, args.device, args.override, Path(tmp) / "run"
            )
        report(figures)
        return
    rows = []
    for variant in args.variants.split(","):
        extra = ("--clients", str(args.clients), "--device", args.device)
        figures = run_self(__file__, variant, args.rounds, args.override, *extra)
        if figures is None:
            continue
        rows.append(figures)
        print(f"  {variant}: {rows[-1]['s_per_round']:.2f} s/round", file=sys.stderr, flush=True)
    anchor = next((r for r in rows if r["variant"] == "per-client"), rows[0] if rows else None)
    print(
        f"default experiment, {args.clients} clients per round, {args.rounds} rounds, {CORES} cores, device {args.device}"
    )
    print(
        f"{'variant':24} {'s/round':>8} {'speed-up':>9} {'held-out loss':>14} {'peak RSS MB':>12} "
        f"{'worker MB':>10} {'GPU MB':>8}"
    )
    for r in rows:
        r["speedup"] = anchor["s_per_round"] / r["s_per_round"] if anchor else None
        print(
            f"{r['variant']:24} {r['s_per_round']:8.2f} {r['speedup']:8.2f}x {r['eval_loss']:14.4f} "
            f"{r['peak_rss_mb']:12.0f} {r['worker_peak_rss_mb']:10.0f} {r.get('gpu_peak_mb', 0):8.0f}"
        )
    print(
        json.dumps(
            {
                "benchmark": "throughput",
                "rounds": args.rounds,
                "clients_per_round": args.clients,
                "cores": CORES,
                "device": args.device,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
