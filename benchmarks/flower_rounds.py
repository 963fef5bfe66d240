"""Question: what does running on Flower cost per round, against fedlora's embedded engine?

The same tiny experiment (tiny-llama, 2 reasoning-gym task clients at ranks 2 and 4, FlexLoRA, both clients
every round, 2 local steps, ``--rounds`` rounds) three ways, in this order: the embedded engine; Flower's
simulation runtime (``engine: flower-sim``, Ray backend, one SuperNode per client); Flower's deployment
runtime on loopback (one SuperLink, two SuperNodes, ``flwr run``; insecure, loopback only). Seconds per
round are the engine's own ``seconds`` per round in metrics.jsonl (start-up excluded), and the wall time of
each whole run (start-up included). Ratios against the embedded engine.

    python benchmarks/flower_rounds.py [--rounds 4] [--model smollm2-135m-instruct] [--no-deployment]

With ``--model`` another model replaces tiny-llama (the issue's question: on SmolLM2 the flower-sim round
should cost at most 10% more than the embedded one). Each Flower client process keeps its model and data
loaded across rounds (``fedlora.engine.flower``: one ClientNode per process and config), so only the first
round pays for loading them; "s / round" is given over all rounds and over rounds 2.. (the steady state).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def overrides(
    root: Path, rounds: int, model: str, local_steps: int = 2, batch_size: int = 2, max_seq_len: int = 96
) -> list[str]:
    return [
        f"model.name={model}",
        "data.tasks=[gcd, lcm]",
        "data.examples_per_task=16",
        f"data.max_seq_len={max_seq_len}",
        "federation.num_clients=2",
        "federation.clients_per_round=2",
        f"federation.rounds={rounds}",
        f"client.local_steps={local_steps}",
        f"client.batch_size={batch_size}",
        "adapter.rank=4",
        "strategy.name=flexlora",
        "resources.distribution=custom",
        "resources.rank_types=[2, 4]",
        "resources.shares=[1, 1]",
        "output.plot=false",
    ]


def per_round(run_dir: Path, skip_first: bool = False) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if skip_first and len(records) > 1:
        records = records[1:]
    return sum(r["seconds"] for r in records) / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--no-deployment", action="store_true", help="skip the loopback deployment run")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=96)
    args = parser.parse_args()
    work = (args.local_steps, args.batch_size, args.max_seq_len)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedlora import load_config
    from fedlora.config.loader import builtin_config_path  # the demo experiment is the base
    from fedlora.engine.flower.deploy import LoopbackDeployment, free_port, write_app
    from fedlora.runner import run_experiment

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for engine in ("embedded", "flower-sim"):
            cfg = load_config(
                builtin_config_path(), [*overrides(root, args.rounds, args.model, *work), f"engine={engine}"]
            )
            started = time.perf_counter()
            run_experiment(cfg, root / engine, show_progress=False)
            rows.append(
                {
                    "engine": engine,
                    "s_per_round": per_round(root / engine),
                    "s_per_round_after_first": per_round(root / engine, skip_first=True),
                    "wall_s": time.perf_counter() - started,
                }
            )
        if args.no_deployment:
            return report(rows, args)
        cfg = load_config(builtin_config_path(), overrides(root, args.rounds, args.model, *work))
        port = free_port()
        app = write_app(root / "app", cfg, root / "deployment", address=f"127.0.0.1:{port}")
        nodes = ["partition-id=0 num-partitions=2", "partition-id=1 num-partitions=2"]
        started = time.perf_counter()
        with LoopbackDeployment(app, nodes, port, root) as deployment:
            deployment.run()
        rows.append(
            {
                "engine": "flower deployment (loopback)",
                "s_per_round": per_round(root / "deployment"),
                "s_per_round_after_first": per_round(root / "deployment", skip_first=True),
                "wall_s": time.perf_counter() - started,
            }
        )
    report(rows, args)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    anchor, steady = rows[0]["s_per_round"], rows[0]["s_per_round_after_first"]
    print(
        f"{args.model}, 2 clients (ranks 2 and 4), FlexLoRA, {args.rounds} rounds, {args.local_steps} local steps "
        f"of batch {args.batch_size}, sequences <= {args.max_seq_len} tokens"
    )
    print(
        f"{'engine':32} {'s / round':>10} {'vs embedded':>12} {'rounds 2..':>11} {'vs embedded':>12} {'wall s':>8}"
    )
    for r in rows:
        r["ratio"] = r["s_per_round"] / anchor
        r["ratio_after_first"] = r["s_per_round_after_first"] / steady
        print(
            f"{r['engine']:32} {r['s_per_round']:10.2f} {r['ratio']:12.2f} {r['s_per_round_after_first']:11.2f} "
            f"{r['ratio_after_first']:12.2f} {r['wall_s']:8.1f}"
        )
    print(
        json.dumps({"benchmark": "flower_rounds", "model": args.model, "rounds": args.rounds, "rows": rows})
    )


if __name__ == "__main__":
    main()
