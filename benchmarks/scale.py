"""Question: does memory stay flat as the federation grows to the full 1,613 Natural Instructions clients?

For N in (16, 160, 1613): a fresh child process runs the same experiment on the first N task clients of
``ni1613-full`` (403k training examples in all): tiny-llama, 8 clients per round, 3 rounds, 4 local steps of
batch 4, held-out loss on a fixed sample of 8 clients (at most 16 examples each), FedIT. Clients stay on
disk (fedlora.data.lazy) and only the examples a batch uses are tokenised. Reported: the child's peak
resident set (VmHWM, whole process: torch, model, data index) and seconds per round, as ratios to N = 16.
The one-time expansion of the gzip file into the cache and its index is done first and timed apart.

    python benchmarks/scale.py [--sizes 16,160,1613] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def overrides(num_clients: int, rounds: int) -> list[str]:
    return [
        "model.name=tiny-llama",
        "data.source=natural-instructions",
        "data.variant=full",
        f"federation.num_clients={num_clients}",
        "federation.clients_per_round=8",
        f"federation.rounds={rounds}",
        "client.local_steps=4",
        "client.batch_size=4",
        "data.max_seq_len=128",
        "data.max_eval_examples_per_client=16",
        "eval.max_clients=8",
        "eval.final_max_clients=8",
        "adapter.rank=8",
        "strategy.name=fedit",
        "output.plot=false",
    ]


def run_one(num_clients: int, rounds: int, queue: mp.Queue) -> None:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    from fedlora import load_config
    from fedlora.config.loader import builtin_config_path  # the demo experiment is the base
    from fedlora.runner import run_experiment

    cfg = load_config(builtin_config_path(), overrides(num_clients, rounds))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = run_experiment(cfg, Path(tmp) / "run", show_progress=False)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        clients = len(json.loads((run_dir / "clients.json").read_text()))
    with open("/proc/self/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    queue.put(
        {
            "clients": clients,
            "peak_mb": peak_kb / 1024,
            "seconds_per_round": sum(r["seconds"] for r in records) / len(records),
            "total_s": time.perf_counter() - started,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,160,1613")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from fedlora.data.lazy import index_folder
    from fedlora.data.sources import find_natural_instructions

    started = time.perf_counter()
    folder = index_folder(find_natural_instructions(None, "full"))
    index_s = time.perf_counter() - started
    ctx = mp.get_context("spawn")
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        queue = ctx.Queue()
        proc = ctx.Process(target=run_one, args=(n, args.rounds, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    anchor = rows[0]
    print(
        f"NI full, tiny-llama, 8 clients/round, {args.rounds} rounds; index ready in {index_s:.1f} s ({folder})"
    )
    print(f"{'clients':>8} {'peak RSS MB':>12} {'vs first':>9} {'s / round':>10} {'vs first':>9}")
    for r in rows:
        r["peak_ratio"] = r["peak_mb"] / anchor["peak_mb"]
        r["time_ratio"] = r["seconds_per_round"] / anchor["seconds_per_round"]
        print(
            f"{r['clients']:>8} {r['peak_mb']:12.1f} {r['peak_ratio']:9.3f} {r['seconds_per_round']:10.2f} {r['time_ratio']:9.3f}"
        )
    print(json.dumps({"benchmark": "scale", "index_seconds": index_s, "rows": rows}))


if __name__ == "__main__":
    main()
