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

Part 3, adversarial (the cases of the "nothing poisoned" report): (a) dropout 0.3, straggler 0.2, corrupt
0.3 (x1e6 norm, NaN, Inf) with min_replies 2 on 4 clients a round; (b) 3 clients a round with 2 of 3
replies x1e6 (min_replies 3), so the round's median itself is poisoned; poisoned = a corrupted reply that was
aggregated; the final adapter's largest value (about 0.15 when clean). (c) SIGTERM and SIGINT at random
moments, then resume: the exit code, and the final adapter bit for bit against an uninterrupted run.

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

# the built-in demo experiment's file first: overrides alone would start from the schema's defaults
DEMO = str(Path(__file__).resolve().parents[1] / "fedlora" / "config" / "builtin" / "default.yaml")
BASE = [
    DEMO,
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


def reference_run(args: list[str], straight: Path) -> tuple[float, dict[str, torch.Tensor]]:
    """An uninterrupted run of ``args`` into ``straight``: its wall seconds and its global adapter."""
    started = time.perf_counter()
    subprocess.run(
        fedlora("run", *args, "--output", str(straight), "--no-progress"), check=True, capture_output=True
    )
    full = time.perf_counter() - started
    return full, load_file(str(straight / "global" / "adapter_model.safetensors"))


def crashes(rounds: int, kill_runs: int, folder: Path) -> dict:
    args = [*BASE, f"federation.rounds={rounds}"]
    full, reference = reference_run(args, folder / "straight")
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


def poisoning(folder: Path, name: str, extra: list[str], rounds: int) -> dict:
    """Run with hostile faults; count corrupted replies that were aggregated (poisoned)."""
    run_dir = folder / name
    proc = subprocess.run(
        fedlora(
            "run", *BASE, f"federation.rounds={rounds}", *extra, "--output", str(run_dir), "--no-progress"
        ),
        capture_output=True,
        text=True,
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    corrupted = {(r["round"], c["client"]) for r in records for c in r.get("faults", {}).get("corrupted", [])}
    rejected = {(r["round"], x["client"]) for r in records for x in r["rejected"]}
    final = load_file(str(run_dir / "global" / "adapter_model.safetensors"))
    return {
        "exit_code": proc.returncode,
        "rounds": len(records),
        "corrupted": len(corrupted),
        "poisoned": len(corrupted - rejected),
        "aggregated_rounds": sum(r["status"] == "aggregated" for r in records),
        "final_max_abs": max(float(v.abs().max()) for v in final.values()),
    }


def signals(rounds: int, trials: int, folder: Path) -> dict:
    """SIGTERM / SIGINT at random moments during the rounds, then resume; compare with an uninterrupted run."""
    args = [*BASE, f"federation.rounds={rounds}"]
    full, reference = reference_run(args, folder / "sig-straight")
    rng = random.Random(11)
    outcome: Counter[str] = Counter()
    identical = 0
    for trial in range(trials):
        signum = (signal.SIGTERM, signal.SIGINT)[trial % 2]
        run_dir = folder / f"sig-{trial}"
        proc = subprocess.Popen(
            fedlora("run", *args, "--output", str(run_dir), "--no-progress"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(rng.uniform(0.3 * full, 0.9 * full))
        proc.send_signal(signum)
        _, err = proc.communicate()
        clean = proc.returncode == 128 + signum and "Traceback" not in err
        finished = proc.returncode == 0  # it ended before the signal arrived
        outcome["clean stop" if clean else "finished first" if finished else f"rc {proc.returncode}"] += 1
        if not finished:  # resume; a signal during start-up leaves no run to resume: start it again
            resumable = (run_dir / "config.yaml").exists()
            again = ["--resume", str(run_dir)] if resumable else [*args, "--output", str(run_dir)]
            subprocess.run(fedlora("run", *again, "--no-progress"), check=True, capture_output=True)
        final = load_file(str(run_dir / "global" / "adapter_model.safetensors"))
        identical += all(torch.equal(final[k], reference[k]) for k in reference)
    return {"trials": trials, "outcomes": dict(outcome), "identical_final_adapters": identical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--kill-runs", type=int, default=5)
    parser.add_argument("--kill-rounds", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        part1 = injected_faults(args.rounds, Path(tmp))
        part2 = crashes(args.kill_rounds, args.kill_runs, Path(tmp))
        hostile = [
            "federation.clients_per_round=4",
            "federation.min_replies=2",
            "federation.max_skipped_rounds=null",
            "faults={dropout: 0.3, straggler: 0.2, corrupt: 0.3, kinds: [norm, nan, inf]}",
        ]
        two_of_three = [
            "federation.clients_per_round=3",
            "federation.min_replies=3",
            "federation.max_skipped_rounds=null",
            "faults={corrupt: 0.67, kinds: [norm]}",
        ]
        part3 = {
            "dropout_straggler_corrupt": poisoning(Path(tmp), "hostile", hostile, 36),
            "two_of_three_corrupted": poisoning(Path(tmp), "two-of-three", two_of_three, 12),
            "signals": signals(args.kill_rounds, 4, Path(tmp)),
        }
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
    for name in ("dropout_straggler_corrupt", "two_of_three_corrupted"):
        r = part3[name]
        print(
            f"{name}: exit {r['exit_code']}, {r['corrupted']} corrupted replies, {r['poisoned']} aggregated "
            f"(poisoned), {r['aggregated_rounds']}/{r['rounds']} rounds aggregated, final max |value| "
            f"{r['final_max_abs']:.3g}"
        )
    sig = part3["signals"]
    print(
        f"signals: {sig['outcomes']} over {sig['trials']} runs; after resuming, final adapter identical to the "
        f"uninterrupted run in {sig['identical_final_adapters']}/{sig['trials']}"
    )
    print(json.dumps({"benchmark": "faults", "injected": part1, "crashes": part2, "adversarial": part3}))


if __name__ == "__main__":
    main()
