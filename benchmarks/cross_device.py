"""Question: does a round cost the same, in memory and seconds, with 1,000, 10,000 or 100,000 clients?

Cross-device federated learning: many clients with a few examples each, a handful sampled per round. The
same pooled data for every N (reasoning-gym, 4 tasks x 50,000 generated problems = 200,000 examples),
split IID into N clients (``partition.method: iid``), clients of four LoRA ranks (``resources.distribution:
uniform`` over the FlexLoRA paper's rank types scaled to tiny-llama, ``rank_scale: 0.05``: r = 1, 2, 2/10,
10) aggregated by FlexLoRA, 8 clients a round, 2 local steps of batch 2, the held-out loss on a fixed sample
of 8 clients. Each N runs in a fresh process (``engine: embedded`` by default, or ``--engine flower-sim``).
Reported: start-up (config to the first round: data, partition, the client registry and rank profiles),
seconds per round (the engine's own, every round), the process's peak resident set (VmHWM; on flower-sim the
server's: the ClientApps run in Ray's actor processes), and the ratios to the first N. The data generation is the same for every N and is part of start-up.

    python benchmarks/cross_device.py [--sizes 1000,10000,100000] [--rounds 3] [--engine embedded]
        [--engine flower-sim --nodes per-sampled-client|per-client|per-client-query]
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
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def overrides(num_clients: int, rounds: int, engine: str, per_task: int) -> list[str]:
    return [
        "model.name=tiny-llama",
        "data.source=reasoning-gym",
        "data.tasks=[basic_arithmetic, chain_sum, gcd, lcm]",
        f"data.examples_per_task={per_task}",
        "data.max_seq_len=96",
        "partition.method=iid",
        f"federation.num_clients={num_clients}",
        "federation.clients_per_round=8",
        f"federation.rounds={rounds}",
        "resources.distribution=uniform",
        "resources.rank_scale=0.05",
        "strategy.name=flexlora",
        "client.local_steps=2",
        "client.batch_size=2",
        "eval.max_clients=8",
        "eval.final_max_clients=8",
        "compute.workers=1",
        f"engine={engine}",
        "output.plot=false",
    ]


#: flower-sim's SuperNodes: one per sampled client (fedlora's), one per client (Flower's examples' way), or one
#: per client found by asking every node for its partition before round 1 (fedlora's deployment routing)
NODES = ("per-sampled-client", "per-client", "per-client-query")


def use_nodes(nodes: str) -> None:
    """Make this process's flower-sim runs use ``nodes`` (:data:`NODES`): the anchors of the measurement."""
    import fedlora.engine.flower.transport as flower_transport
    import fedlora.session.lifecycle as lifecycle

    if nodes != "per-sampled-client":
        flower_transport.simulation_nodes = lambda fed, n: n
    if nodes == "per-client-query":
        server_app = lifecycle.flower_server_app
        lifecycle.flower_server_app = lambda *args, **kw: server_app(*args, **{**kw, "routing": "query"})


def run_one(num_clients: int, rounds: int, engine: str, per_task: int, nodes: str, queue: mp.Queue) -> None:
    import torch

    torch.set_num_threads(1)
    use_nodes(nodes)
    from fedlora import load_config
    from fedlora.runner import run

    started = time.perf_counter()
    cfg = load_config(None, overrides(num_clients, rounds, engine, per_task))
    with tempfile.TemporaryDirectory() as tmp:
        result = run(cfg, Path(tmp) / "run", show_progress=False)
        wall = time.perf_counter() - started
        clients = len(json.loads((result.run_dir / "clients.json").read_text()))
    seconds = [r["seconds"] for r in result.records]
    with open("/proc/self/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    queue.put(
        {
            "clients": clients,
            "engine": engine,
            "nodes": nodes,
            "startup_s": wall - sum(seconds),
            "seconds": seconds,
            "seconds_per_round": sum(seconds) / len(seconds),
            # round 1 also builds the clients' side where it is lazy (Flower's ClientApps in their actors)
            "seconds_per_round_after_first": sum(seconds[1:]) / max(len(seconds) - 1, 1),
            "peak_mb": peak_kb / 1024,
            "eval_loss": result.records[-1].get("eval_loss"),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engine", default="embedded", choices=["embedded", "flower-sim"])
    parser.add_argument("--per-task", type=int, default=50_000, help="problems per reasoning-gym task")
    parser.add_argument("--nodes", default=NODES[0], choices=NODES, help="flower-sim's SuperNodes (NODES)")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        queue = ctx.Queue()
        proc = ctx.Process(
            target=run_one, args=(n, args.rounds, args.engine, args.per_task, args.nodes, queue)
        )
        proc.start()
        rows.append(queue.get())
        proc.join()
        print(f"  {n} clients: {rows[-1]['seconds_per_round']:.2f} s/round", flush=True)
    anchor = rows[0]
    print(
        f"{4 * args.per_task} examples split IID, FlexLoRA over 4 rank types, 8 clients/round, "
        f"{args.rounds} rounds, engine {args.engine}"
        + (f" (SuperNodes {args.nodes})" if args.engine == "flower-sim" else "")
        + ", tiny-llama, 1 thread"
    )
    print(
        f"{'clients':>8} {'start-up s':>11} {'s / round':>10} {'vs first':>9} {'rounds 2..':>11} "
        f"{'peak RSS MB':>12} {'vs first':>9}"
    )
    for r in rows:
        r["time_ratio"] = r["seconds_per_round"] / anchor["seconds_per_round"]
        r["peak_ratio"] = r["peak_mb"] / anchor["peak_mb"]
        print(
            f"{r['clients']:>8} {r['startup_s']:11.1f} {r['seconds_per_round']:10.3f} {r['time_ratio']:9.3f} "
            f"{r['seconds_per_round_after_first']:11.3f} {r['peak_mb']:12.1f} {r['peak_ratio']:9.3f}"
        )
    print(
        json.dumps(
            {
                "benchmark": "cross_device",
                "engine": args.engine,
                "nodes": args.nodes,
                "rounds": args.rounds,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
