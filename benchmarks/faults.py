"""Question: with clients dropping out, straggling and sending corrupted updates, and the server killed
(SIGKILL) at random moments, does every run finish with nothing lost?

Part 1, injected faults: tiny-llama on reasoning-gym (8 task clients, 6 per round, 30 rounds, FedIT) with
``faults: {dropout: 0.1, straggler: 0.1, corrupt: 0.2}`` (corruptions: NaN, Inf, wrong shape, wrong rank,
absurd norm) and ``federation.min_replies: 3, on_too_few: retry``. Counts from metrics.jsonl: faults
injected by kind, replies rejected (each must be an injected fault: no false rejection, no corrupted
update accepted), rounds aggregated / skipped, and data lost (rounds missing from the log, checkpoints
failing their checksum, non-finite values in the final adapter).

Part 2, crashes: the same run without faults is SIGKILLed at uniformly random moments (up to 3 times per
run, startup included) and resumed until it finishes, ``--kill-runs`` times; the final adapter is compared
bit for bit with an uninterrupted run.

    python benchmarks/faults.py [--rounds 30] [--kill-runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

BASE = [
    "model.name=tiny-llama",
    "data.tasks=[basic_arithmetic, chain_sum, gcd, lcm, leg_counting, letter_counting, number_sorting, word_sorting]",
    "data.examples_per_task=32",
    "data.max_seq_len=96",
    "federation.clients_per_round=6",
    "client.local_steps=2",
    "client.batch_size=4",
    "client.lr=1e-3",
    "adapter.rank=4",
    "output.plot=false",
]


def fedlora(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedlora", *args]


def injected_faults(rounds: int, folder: Path) -> dict:
    run_dir = folder / "faulty"
    faults = ["faults.dropout=0.1", "faults.straggler=0.1", "faults.corrupt=0.2"]
    robust = ["federation.min_replies=3", "federation.on_too_few=retry"]
    subprocess.run(
        fedlora(
            "run",
            *BASE,
            f"federation.rounds={rounds}",
            *faults,
            *robust,
            "--output",
            str(run_dir),
            "--no-progress",
        ),
        check=True,
        capture_output=True,
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    injected: Counter[str] = Counter()
    for r in records:
        f = r.get("faults", {})
        injected["dropout"] += len(f.get("dropped", []))
        injected["straggler"] += len(f.get("late", []))
        for c in f.get("corrupted", []):
            injected[f"corrupt:{c['kind']}"] += 1
    rejected = sum(len(r["rejected"]) for r in records)
    from fedlora.engine.checkpoint import list_rounds, load_checkpoint

    bad_checkpoints = 0
    for n in list_rounds(run_dir / "checkpoints"):
        try:
            load_checkpoint(run_dir / "checkpoints" / f"round_{n}")
        except Exception:
            bad_checkpoints += 1
    final = load_file(str(run_dir / "global" / "adapter_model.safetensors"))
    return {
        "rounds": rounds,
        "injected": dict(injected),
        "injected_total": sum(injected.values()),
        "rejected": rejected,
        "aggregated_rounds": sum(r["status"] == "aggregated" for r in records),
        "skipped_rounds": sum(r["status"] == "skipped" for r in records),
        "retries": sum(r["attempts"] - 1 for r in records),
        "rounds_missing": rounds - len({r["round"] for r in records}),
        "bad_checkpoints": bad_checkpoints,
        "final_finite": all(bool(torch.isfinite(v).all()) for v in final.values()),
    }


def crashes(rounds: int, kill_runs: int, folder: Path) -> dict:
    straight = folder / "straight"
    args = [*BASE, f"federation.rounds={rounds}"]
    started = time.perf_counter()
    subprocess.run(
        fedlora("run", *args, "--output", str(straight), "--no-progress"), check=True, capture_output=True
    )
    full = time.perf_counter() - started
    reference = load_file(str(straight / "global" / "adapter_model.safetensors"))
    rng = random.Random(7)
    kills, identical = 0, 0
    for trial in range(kill_runs):
        run_dir = folder / f"killed-{trial}"
        trial_kills = 0
        while not (run_dir / "global" / "adapter_model.safetensors").exists():
            cmd = (
                fedlora("run", "--resume", str(run_dir), "--no-progress")
                if (run_dir / "config.yaml").exists()
                else fedlora("run", *args, "--output", str(run_dir), "--no-progress")
            )
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:  # up to 3 kills a run at random moments, then it may finish
                proc.wait(timeout=rng.uniform(0.5, full) if trial_kills < 3 else None)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                trial_kills += 1
        final = load_file(str(run_dir / "global" / "adapter_model.safetensors"))
        identical += all(torch.equal(final[k], reference[k]) for k in reference)
    return {
        "runs": kill_runs,
        "sigkills": kills,
        "identical_final_adapters": identical,
        "uninterrupted_s": full,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--kill-runs", type=int, default=5)
    parser.add_argument("--kill-rounds", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        part1 = injected_faults(args.rounds, Path(tmp))
        part2 = crashes(args.kill_rounds, args.kill_runs, Path(tmp))
    print(f"injected faults over {part1['rounds']} rounds: {part1['injected_total']} {part1['injected']}")
    print(
        f"rejected {part1['rejected']}; rounds aggregated {part1['aggregated_rounds']}, skipped "
        f"{part1['skipped_rounds']}, retries {part1['retries']}"
    )
    print(
        f"data lost: rounds missing {part1['rounds_missing']}, bad checkpoints {part1['bad_checkpoints']}, "
        f"final adapter finite: {part1['final_finite']}"
    )
    print(
        f"SIGKILL: {part2['sigkills']} kills over {part2['runs']} runs; final adapter identical to the "
        f"uninterrupted run in {part2['identical_final_adapters']}/{part2['runs']}"
    )
    print(json.dumps({"benchmark": "faults", "injected": part1, "crashes": part2}))


if __name__ == "__main__":
    main()
