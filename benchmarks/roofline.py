"""Question: how close does a local training step of the default experiment come to what this machine's
matrix units can do, in fp32, under bf16 autocast, and with the frozen base kept in bf16
(``compute.base_dtype: bf16``)?

1. The machine's GEMM rate (``F.linear``, what ``nn.Linear`` runs) at the model's own shapes (SmolLM2-135M, batch 4 x 128 tokens = 512 rows: the
   q/o projections 576 x 576, k/v 576 x 192, the MLP 576 x 1536 and 1536 x 576, the output layer
   576 x 49152), fp32 and bf16, with every core; the peak is the FLOP-weighted rate over one step's GEMMs.
2. One client's local step (forward, backward to the activations and the LoRA factors, AdamW) on the real
   model, per way: ``fp32``; ``autocast-bf16`` (``compute.precision: bf16``: the frozen weights cast at every
   forward); ``base-bf16`` (``compute.base_dtype: bf16``: cast once at load); with ``--compile`` also
   ``fp32-compiled`` (the PEFT model under ``torch.compile``, inductor; its two compiling steps reported as
   warm-up, not timed). Its FLOPs are counted, not
   measured: 2 x (multiply-adds of every linear layer) x tokens forward, the same again backward for the
   activation gradients (the frozen weights get none), attention's two matmuls, LoRA's small ones ignored.
   Achieved FLOP/s / the GEMM peak of its dtype is the fraction of the roofline.
3. What autocast's casts cost: under ``torch.autocast`` a frozen weight (``requires_grad=False``, so outside
   autocast's weight cache) is cast to bf16 at every forward that uses it, so one step casts every linear
   weight of the base once (backward reuses the forward's copies). Timed directly: every frozen ``nn.Linear``
   weight of the fp32 model through ``.to(torch.bfloat16)``, best of 5 passes, as seconds per step and as
   a share of each way's step. ``compute.base_dtype: bf16`` pays this once, at load.

On a GPU (``--device auto`` picks cuda:0 when there is one) the same measurements run there, each timing
between ``torch.cuda.synchronize()`` calls.

    python benchmarks/roofline.py [--steps 6] [--threads N] [--device auto|cpu|cuda] [--model NAME|DIR] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
ROWS = 4 * 128


def gemm_shapes(config) -> list[tuple[str, int, int, int]]:  # noqa: ANN001
    """(name, k, n, count per step) of the linear layers of one forward pass (rows = ROWS)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = h * config.num_key_value_heads // config.num_attention_heads
    return [
        ("q/o", h, h, 2 * layers),
        ("k/v", h, kv, 2 * layers),
        ("gate/up", h, i, 2 * layers),
        ("down", i, h, layers),
        ("lm_head", h, config.vocab_size, 1),
    ]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a wall-clock timing covers them (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(k: int, n: int, dtype: torch.dtype, device: torch.device, seconds: float = 0.6) -> float:
    """FLOP/s of ``F.linear`` of (ROWS x k) by an (n x k) weight in ``dtype`` on ``device`` (the kernel
    nn.Linear runs), the best of repeated timings (of 10 calls each on a GPU, whose launches are queued)."""
    x = torch.randn(ROWS, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device)
    calls = 10 if device.type == "cuda" else 1
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    synchronize(device)
    best, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        for _ in range(calls):
            torch.nn.functional.linear(x, w)
        synchronize(device)
        best = min(best, (time.perf_counter() - t) / calls)
    return 2 * ROWS * k * n / best


def step_flops(config, tokens: int) -> float:  # noqa: ANN001
    """Forward + activation-gradient backward FLOPs of one step (see the module docstring)."""
    linear = sum(k * n * count for _, k, n, count in gemm_shapes(config))
    attention = 2 * 2 * config.num_hidden_layers * tokens * 128 * config.hidden_size  # QK^T and AV, T=128
    return 2 * (2 * linear * tokens + attention)


def weight_cast_seconds(model: torch.nn.Module, repeats: int = 5) -> tuple[float, int]:
    """Seconds to cast every frozen ``nn.Linear`` weight of ``model`` to bf16 once (what autocast does per forward
    for frozen weights), the best of ``repeats`` passes, and the number of weights cast."""
    weights = [
        m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
    ]
    device = weights[0].device
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        for weight in weights:
            weight.to(torch.bfloat16)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best, sum(w.numel() for w in weights)


def time_steps(way: str, steps: int, device: torch.device, model_name: str, warmup: bool = True) -> dict:
    from fedlora.adapters.lora import LoraAdapters
    from fedlora.config.schema import AdapterConfig, ComputeConfig, ModelConfig
    from fedlora.models.loading import load_base_model

    precision = "fp32" if way.startswith("fp32") else "bf16"
    compute = ComputeConfig(
        device=str(device), precision=precision, base_dtype="bf16" if way == "base-bf16" else "fp32"
    )
    bundle = load_base_model(ModelConfig(name=model_name), compute=compute)
    adapters = LoraAdapters(bundle.model, AdapterConfig(rank=8, alpha=16, dropout=0.0), "causal-lm")
    adapters.initial_state()
    model = adapters.model
    model.train()
    params = [p for _, p in adapters.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(
        0, bundle.model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0)
    ).to(device)
    # torch.compile (inductor): the first steps compile the forward and backward graphs
    forward = torch.compile(model) if way == "fp32-compiled" else model
    warmups = (2 if way == "fp32-compiled" else 1) if warmup else 0
    times, losses = [], []
    for _ in range(steps + warmups):  # the first one(s) warm the kernels up
        synchronize(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        synchronize(device)
        times.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
    seconds = sum(times[warmups:]) / steps
    flops = step_flops(bundle.model.config, ids.numel())
    row = {
        "way": way,
        "s_per_step": seconds,
        "timed_steps": steps,
        "gflops": flops / seconds / 1e9,
        "first_loss": losses[0],
        "warmup_s": sum(times[:warmups]),
        "config": bundle.model.config,
    }
    if way == "fp32":  # autocast's casts, timed on the fp32 model (module docstring, 3.)
        row["weight_cast"] = weight_cast_seconds(model)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=CORES)
    parser.add_argument("--device", default="auto", help="auto (cuda:0 when there is one), cpu, cuda[:N]")
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="model.name: a built-in or a folder (a GPU machine gets the architecture with random weights)",
    )
    parser.add_argument("--compile", action="store_true", help="also an fp32 step under torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fedlora.compute import describe_machine, resolve_device

    device = resolve_device(args.device)
    machine = describe_machine(device)
    from transformers import AutoConfig

    from fedlora.config.schema import ModelConfig
    from fedlora.models.loading import resolve_model_folder

    config = AutoConfig.from_pretrained(resolve_model_folder(ModelConfig(name=args.model)))
    shapes = gemm_shapes(config)
    weight = [k * n * count for _, k, n, count in shapes]
    print(f"{machine['device']} ({machine['cpu']}, {args.threads} threads)")
    print(f"GEMM rates at the model's shapes ({ROWS} rows), GFLOP/s")
    print(f"{'shape':10} {'k x n':>12} {'fp32':>8} {'bf16':>8}")
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for name, k, n, _ in shapes:
        for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            rates[key].append(gemm_rate(k, n, dtype, device))
        print(f"{name:10} {f'{k} x {n}':>12} {rates['fp32'][-1] / 1e9:8.1f} {rates['bf16'][-1] / 1e9:8.1f}")
    peaks = {  # the step's GEMM time at these rates, as one rate
        key: sum(weight) / sum(w / r for w, r in zip(weight, values, strict=True))
        for key, values in rates.items()
    }
    print(f"{'step peak':10} {'':>12} {peaks['fp32'] / 1e9:8.1f} {peaks['bf16'] / 1e9:8.1f}\n")
    # without bf16 matrix units (no AVX-512-BF16 / AMX) a bf16 step takes minutes: time one, no warm-up
    slow_bf16 = peaks["bf16"] < 0.5 * peaks["fp32"]
    rows = [time_steps("fp32", args.steps, device, args.model)]
    if args.compile:
        rows.append(time_steps("fp32-compiled", args.steps, device, args.model))
    for way in ("autocast-bf16", "base-bf16"):
        rows.append(time_steps(way, 1 if slow_bf16 else args.steps, device, args.model, warmup=not slow_bf16))
    for row in rows:
        row.pop("config")
    cast_s, cast_numel = rows[0].pop("weight_cast")
    anchor = rows[0]["s_per_step"]
    print(f"one local step (4 x 128 tokens, LoRA r=8), {args.threads} threads")
    print(f"{'way':14} {'s/step':>7} {'speed-up':>9} {'GFLOP/s':>8} {'of peak':>8} {'step-1 loss':>12}")
    for row in rows:
        peak = peaks["fp32" if row["way"].startswith("fp32") else "bf16"]
        row["speedup"] = anchor / row["s_per_step"]
        row["fraction_of_peak"] = row["gflops"] * 1e9 / peak
        print(
            f"{row['way']:14} {row['s_per_step']:7.3f} {row['speedup']:8.2f}x {row['gflops']:8.1f} "
            f"{row['fraction_of_peak']:7.0%} {row['first_loss']:12.4f}"
        )
    cast_share = {row["way"]: cast_s / row["s_per_step"] for row in rows}
    print(
        f"\nautocast's per-step weight casts: {cast_numel / 1e6:.1f}M frozen linear weights fp32 -> bf16 in "
        f"{cast_s * 1e3:.1f} ms; "
        + ", ".join(f"{share:.1%} of the {way} step" for way, share in cast_share.items())
    )
    print(
        json.dumps(
            {
                "benchmark": "roofline",
                "machine": machine,
                "threads": args.threads,
                "cpu_bf16_units": not slow_bf16,
                "gemm_gflops": {k: [r / 1e9 for r in v] for k, v in rates.items()},
                "peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
                "rows": rows,
                "weight_cast_s": cast_s,
                "weights_cast": cast_numel,
                "weight_cast_share": cast_share,
            }
        )
    )


if __name__ == "__main__":
    main()
