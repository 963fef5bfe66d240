"""Question: what does running on Flower cost per round, against fedlora's embedded engine?

The same tiny experiment (tiny-llama, 2 reasoning-gym task clients at ranks 2 and 4, FlexLoRA, both clients
every round, 2 local steps, ``--rounds`` rounds) three ways, in this order: the embedded engine; Flower's
simulation runtime (``engine: flower-sim``, Ray backend, one SuperNode per client); Flower's deployment
runtime on loopback (one SuperLink, two SuperNodes, ``flwr run``; insecure, loopback only). Seconds per
round are the engine's own ``seconds`` per round in metrics.jsonl (start-up excluded), and the wall time of
each whole run (start-up included). Ratios against the embedded engine.

    python benchmarks/flower_rounds.py [--rounds 4]
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


def overrides(root: Path, rounds: int) -> list[str]:
    return [
        "model.name=tiny-llama",
        "data.tasks=[gcd, lcm]",
        "data.examples_per_task=16",
        "data.max_seq_len=96",
        "federation.num_clients=2",
        "federation.clients_per_round=2",
        f"federation.rounds={rounds}",
        "client.local_steps=2",
        "client.batch_size=2",
        "adapter.rank=4",
        "strategy.name=flexlora",
        "resources.distribution=custom",
        "resources.rank_types=[2, 4]",
        "resources.shares=[1, 1]",
        "output.plot=false",
    ]


def per_round(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(r["seconds"] for r in records) / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedlora.config import load_config
    from fedlora.engine.flower_deploy import LoopbackDeployment, free_port, write_app
    from fedlora.runner import run_experiment

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for engine in ("embedded", "flower-sim"):
            cfg = load_config(None, [*overrides(root, args.rounds), f"engine={engine}"])
            started = time.perf_counter()
            run_experiment(cfg, root / engine, show_progress=False)
            rows.append(
                {
                    "engine": engine,
                    "s_per_round": per_round(root / engine),
                    "wall_s": time.perf_counter() - started,
                }
            )
        cfg = load_config(None, overrides(root, args.rounds))
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
                "wall_s": time.perf_counter() - started,
            }
        )
    anchor = rows[0]["s_per_round"]
    print(f"tiny-llama, 2 clients (ranks 2 and 4), FlexLoRA, {args.rounds} rounds")
    print(f"{'engine':32} {'s / round':>10} {'vs embedded':>12} {'wall s':>8}")
    for r in rows:
        r["ratio"] = r["s_per_round"] / anchor
        print(f"{r['engine']:32} {r['s_per_round']:10.2f} {r['ratio']:12.1f} {r['wall_s']:8.1f}")
    print(json.dumps({"benchmark": "flower_rounds", "rounds": args.rounds, "rows": rows}))


if __name__ == "__main__":
    main()
