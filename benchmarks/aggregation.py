"""Question: how much faster and leaner is FlexLoRA's factored SVD than forming Delta and running a full SVD?

Per module: 10 clients with ranks spread from 4 to 64 (sum R = 340), random factors, example weights.
Dense path (the naive way): Delta = sum_i w_i B_i A_i as a d x k matrix, then ``torch.linalg.svd``.
Factored path: ``fedlora.linalg.lowrank_svd`` (QR of the stacked factors, SVD of the R x R core).
Both in float32 (what a user of torch would run), each in a fresh child process, after a warm-up call, with
the kernel's peak-RSS mark reset, so the peak resident memory the path adds over its inputs is read from the
OS (/proc/self/status VmHWM). Accuracy: the max relative difference (max |x - y| /
max |y|) between the two paths' rank-r truncations U_r S_r V_r^T for r in {4, 16, 64}.
Also: a whole LLaMA-7B-shaped adapter (32 layers x q/k/v/o 4096 x 4096, gate/up 11008 x 4096,
down 4096 x 11008) aggregated by ``FlexLoRA.aggregate`` as the server runs it (float64 inside).

    python benchmarks/aggregation.py [--skip-7b-dense] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

import torch

RANKS = [4, 11, 17, 24, 31, 37, 44, 51, 57, 64]
SHAPES = {
    "llama-7b q/k/v/o 4096x4096": (4096, 4096),
    "smollm2 q/o 576x576": (576, 576),
    "smollm2 k/v 192x576": (192, 576),
    "smollm2 gate/up 1536x576": (1536, 576),
    "smollm2 down 576x1536": (576, 1536),
}
TRUNCATIONS = (4, 16, 64)


def factors(d: int, k: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    gen = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d, r, generator=gen) / r**0.5 for r in RANKS]
    As = [torch.randn(r, k, generator=gen) / k**0.5 for r in RANKS]
    sizes = torch.randint(5, 50, (len(RANKS),), generator=gen).tolist()
    return Bs, As, [n / sum(sizes) for n in sizes]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_path(path: str, d: int, k: int, repeats: int, queue: mp.Queue) -> None:
    """In a child: time ``path`` and report the peak RSS it adds over its inputs, and its truncations."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from fedlora.linalg import dense_svd, lowrank_svd

    Bs, As, w = factors(d, k)
    fn = lowrank_svd if path == "factored" else dense_svd
    fn(Bs[:1], As[:1], w[:1])  # warm up libraries (lazy kernels and allocations) before measuring
    base = rss_bytes()
    reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        U, S, Vh = fn(Bs, As, w)
        times.append(time.perf_counter() - start)
    peak = peak_rss_bytes() - base
    truncs = {r: ((U[:, :r] * S[:r]) @ Vh[:r]).numpy() for r in TRUNCATIONS}  # numpy: no shared-memory fds
    queue.put({"seconds": sorted(times)[len(times) // 2], "peak_bytes": max(peak, 0), "truncs": truncs})


def in_child(path: str, d: int, k: int, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_path, args=(path, d, k, repeats, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def whole_model_7b() -> float:
    """Seconds for FlexLoRA.aggregate over a LLaMA-7B-shaped adapter (224 modules), 10 heterogeneous clients."""
    from fedlora.adapters.ranks import RankProfile
    from fedlora.engine.server import Server
    from fedlora.strategies.base import ClientReply, ServerSetup
    from fedlora.strategies.flexlora import FlexLoRA

    shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096)}
    shapes |= {"gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
    gen = torch.Generator().manual_seed(1)

    def state(rank: int, zero: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for layer in range(32):
            for name, (d, k) in shapes.items():
                part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                path = f"base_model.model.model.layers.{layer}.{part}.{name}"
                out[f"{path}.lora_A.weight"] = torch.randn(rank, k, generator=gen) / k**0.5
                out[f"{path}.lora_B.weight"] = (
                    torch.zeros(d, rank) if zero else torch.randn(d, rank, generator=gen) / rank**0.5
                )
        return out

    profiles = {i: RankProfile.uniform(r) for i, r in enumerate(RANKS)}
    server = Server(FlexLoRA(), ServerSetup(state(max(RANKS), zero=True), profiles, lora_alpha=16.0))
    replies = [ClientReply(i, state(r), 10 + i) for i, r in enumerate(RANKS)]
    start = time.perf_counter()
    server.aggregate(1, replies)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the factored path (median)")
    parser.add_argument("--skip-whole-model", action="store_true")
    args = parser.parse_args()
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    rows = []
    for name, (d, k) in SHAPES.items():
        dense_repeats = 1 if d * k > 4_000_000 else args.repeats
        dense = in_child("dense", d, k, dense_repeats)
        fact = in_child("factored", d, k, args.repeats)
        diff = max(
            float(abs(fact["truncs"][r] - dense["truncs"][r]).max() / abs(dense["truncs"][r]).max())
            for r in TRUNCATIONS
        )
        rows.append(
            {
                "shape": name,
                "d": d,
                "k": k,
                "dense_s": dense["seconds"],
                "factored_s": fact["seconds"],
                "speedup": dense["seconds"] / fact["seconds"],
                "dense_peak_mb": dense["peak_bytes"] / 2**20,
                "factored_peak_mb": fact["peak_bytes"] / 2**20,
                "memory_ratio": dense["peak_bytes"] / max(fact["peak_bytes"], 1),
                "max_rel_diff": diff,
            }
        )
    print(f"10 clients, ranks {RANKS} (R = {sum(RANKS)}), float32, {threads} threads")
    print(
        f"{'module shape':28} {'dense s':>9} {'factored s':>10} {'speedup':>8} "
        f"{'dense MB':>9} {'fact. MB':>9} {'mem ratio':>9} {'max rel diff':>12}"
    )
    for r in rows:
        print(
            f"{r['shape']:28} {r['dense_s']:9.3f} {r['factored_s']:10.4f} {r['speedup']:8.1f} "
            f"{r['dense_peak_mb']:9.1f} {r['factored_peak_mb']:9.1f} {r['memory_ratio']:9.1f} {r['max_rel_diff']:12.2e}"
        )
    result = {"benchmark": "aggregation", "ranks": RANKS, "threads": threads, "rows": rows}
    if not args.skip_whole_model:
        torch.set_num_threads(threads)
        seconds = whole_model_7b()
        print(f"whole LLaMA-7B-shaped adapter (224 modules, 10 clients), FlexLoRA.aggregate: {seconds:.1f} s")
        result["llama7b_whole_model_s"] = seconds
    print(json.dumps(result))


if __name__ == "__main__":
    main()
