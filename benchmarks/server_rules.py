"""Question: what does each method's server rule cost per round, against FedIT's plain averaging?

Every first-order method aggregates the same round: K clients (``--clients``) at rank ``--rank`` on the target
modules of SmolLM2-135M (30 layers of q_proj 576 x 576 and v_proj 192 x 576 by default, as in
docs/comparison.md), each reply holding what that method's clients send (the payload's tensors minus the
ones its client hooks freeze; random values). Reported per method: the median over ``--repeats`` of
``strategy.aggregate`` on a fresh strategy (seconds, CPU float64 where the method computes in it), the
ratio to FedIT measured in the same run, and the bytes of one reply and of one payload.

    python benchmarks/server_rules.py [--clients 4] [--rank 8] [--layers 30] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

METHODS = [
    "fedit",
    "ffa-lora",
    "flexlora",
    "hetlora",
    "rolora",
    "fedsvd",
    "lora-fair",
    "fedex-lora",
    "flora",
    "fed-sb",
]
MODULES = {"q_proj": (576, 576), "v_proj": (192, 576)}  # (d_out, d_in) of SmolLM2-135M


def initial_state(rank: int, layers: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for layer in range(layers):
        for name, (d, k) in MODULES.items():
            path = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            state[f"{path}.lora_A.weight"] = torch.randn(rank, k, generator=gen) / k**0.5
            state[f"{path}.lora_B.weight"] = torch.zeros(d, rank)
    return state


def build(name: str, rank: int, layers: int, clients: int):
    from fedlora.adapters.ranks import RankProfile, module_factors
    from fedlora.engine.server import Server
    from fedlora.strategies import STRATEGIES
    from fedlora.strategies.base import ServerSetup

    gen = torch.Generator().manual_seed(0)
    strategy = STRATEGIES.get(name)()
    init = initial_state(rank, layers, gen)
    if name == "fed-sb":  # its own initialisation: orthonormal B, and an r x r core per module
        for module, (_, b_key) in module_factors(dict(init)).items():
            init[b_key] = torch.linalg.qr(torch.randn(init[b_key].shape, generator=gen))[0]
            init[f"{module}.lora_R.weight"] = torch.zeros(rank, rank)
    profiles = {i: RankProfile.uniform(rank) for i in range(clients)}
    return Server(strategy, ServerSetup(init, profiles, lora_alpha=2.0 * rank)), gen


def replies_for(server, gen: torch.Generator, clients: int):
    from fedlora.adapters.merged import split_merged
    from fedlora.adapters.state import wire_size
    from fedlora.strategies.base import ClientReply

    instructions = server.configure(1, list(range(clients)))
    replies = []
    for cid, instruction in instructions.items():
        adapter, _ = split_merged(instruction.payload)
        sent = {
            k: v + 0.01 * torch.randn(v.shape, generator=gen)
            for k, v in adapter.items()
            if not any(h.frozen(k) for h in instruction.hooks)
        }
        reply = ClientReply(cid, sent, 10 + cid)
        problem = server.validate_reply(instruction, reply)
        if problem:
            raise RuntimeError(f"{server.strategy.name}: {problem}")
        replies.append(reply)
    return replies, wire_size(replies[0].payload), wire_size(instructions[0].payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in METHODS:
        times = []
        for _ in range(args.repeats):
            server, gen = build(name, args.rank, args.layers, args.clients)
            replies, up, down = replies_for(server, gen, args.clients)
            started = time.perf_counter()
            server.aggregate(1, replies)
            times.append(time.perf_counter() - started)
        rows.append(
            {
                "method": name,
                "aggregate_s": statistics.median(times),
                "reply_bytes": up,
                "payload_bytes": down,
            }
        )
    anchor = rows[0]["aggregate_s"]
    print(
        f"{args.clients} clients, rank {args.rank}, {args.layers} layers x q_proj 576x576 + v_proj 192x576, "
        f"1 thread, median of {args.repeats}"
    )
    print(f"{'method':12} {'aggregate s':>12} {'x fedit':>8} {'reply KB':>9} {'payload KB (round 1)':>21}")
    for r in rows:
        r["ratio"] = r["aggregate_s"] / anchor
        print(
            f"{r['method']:12} {r['aggregate_s']:12.4f} {r['ratio']:8.1f} {r['reply_bytes'] / 1024:9.1f} "
            f"{r['payload_bytes'] / 1024:21.1f}"
        )
    print(json.dumps({"benchmark": "server_rules", **vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
