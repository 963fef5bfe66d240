"""Question: does zeroth-order (MeZO) client training really run at inference-level memory?

Each mode runs in a fresh child process that loads SmolLM2-135M-Instruct (float32) with LoRA r=8 on
q/k/v/o, builds one batch of 4 reasoning-gym examples (max 128 tokens),
runs one warm-up inference pass (pages the memory-mapped weights in, in every mode alike), resets the
kernel's peak-RSS mark, then does one client step exactly as fedlora does it:

- ``inference``: the loss of the batch under ``torch.no_grad`` (the anchor);
- ``zeroth-order``: one MeZO step through ``train_locally`` (two forward passes, perturbations regenerated);
- ``first-order LoRA``: one AdamW step through ``train_locally`` (backward through the frozen model);
- ``first-order full``: one AdamW step on every weight of the model (full fine-tuning).

Reported: peak resident set of the whole process during the step (VmHWM after the reset) and its ratio to
inference; also what a client uploads per round (local_steps = 30): the adapter (weights) vs the seeds and
scalars of its steps, as safetensors bytes.

    python benchmarks/memory.py [--model smollm2-135m-instruct] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

MODES = ("inference", "zeroth-order", "first-order LoRA", "first-order full")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(mode: str, model_name: str, queue: mp.Queue) -> None:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    from fedlora.adapters.lora import LoraAdapters
    from fedlora.client.loss import batch_loss
    from fedlora.client.settings import LocalTrainingSettings
    from fedlora.client.trainer import train_locally
    from fedlora.client.zeroth_order import ZerothOrder
    from fedlora.config.schema import AdapterConfig, ModelConfig
    from fedlora.data.encoding import Encoder, collate
    from fedlora.data.examples import ClientData
    from fedlora.data.sources import reasoning_gym_examples
    from fedlora.models.loading import load_base_model

    bundle = load_base_model(ModelConfig(name=model_name))
    adapters = LoraAdapters(bundle.model, AdapterConfig(rank=8, dropout=0.0), "causal-lm")
    state = adapters.initial_state()
    encoder = Encoder(bundle.tokenizer, "causal-lm", 128)
    examples = reasoning_gym_examples(["basic_arithmetic"], 4, seed=0)
    client = ClientData(0, "c", examples, [], [])
    batch = collate(encoder.encode_all(examples), bundle.tokenizer.pad_token_id)
    adapters.load(state)
    model = adapters.model
    with torch.no_grad():  # warm-up: pages the weights in (safetensors are memory-mapped) and runs the
        batch_loss(model, batch, "causal-lm")  # loss path's one-time check, in every mode alike
    loaded_kb = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark
    common = dict(lr=1e-4, local_steps=1, batch_size=4, grad_clip=None)
    if mode == "inference":
        with torch.no_grad():
            batch_loss(model, batch, "causal-lm")
    elif mode == "zeroth-order":
        train_locally(
            adapters,
            encoder,
            client,
            state,
            LocalTrainingSettings(optimizer="sgd", **common),
            1,
            [ZerothOrder()],
        )
    elif mode == "first-order LoRA":
        train_locally(adapters, encoder, client, state, LocalTrainingSettings(optimizer="adamw", **common), 1)
    else:
        base = model.get_base_model()
        params = list(base.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        model.train()
        batch_loss(model, batch, "causal-lm").backward()
        optimizer.step()
    queue.put({"mode": mode, "peak_mb": _status_kb("VmHWM") / 1024, "loaded_mb": loaded_kb / 1024})


def upload_bytes(model_name: str, steps: int) -> dict[str, int]:
    import torch

    from fedlora.adapters.lora import LoraAdapters
    from fedlora.adapters.state import wire_size
    from fedlora.client.zeroth_order import steps_record
    from fedlora.config.schema import AdapterConfig, ModelConfig
    from fedlora.models.loading import load_base_model

    bundle = load_base_model(ModelConfig(name=model_name))
    state = LoraAdapters(bundle.model, AdapterConfig(rank=8), "causal-lm").initial_state()
    record = steps_record(
        [[2**62 + i] for i in range(steps)], [[0.5] for _ in range(steps)], [1e-4] * steps, 0.0
    )
    assert all(isinstance(v, torch.Tensor) for v in record.values())
    return {"weights": wire_size(state), "seeds": wire_size(record)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=30, help="local steps per round, for the upload sizes")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for mode in MODES:
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(mode, args.model, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    anchor = rows[0]["peak_mb"]
    print(f"{args.model}, LoRA r=8 on q/k/v/o, batch 4 x <=128 tokens, float32, 1 thread")
    print(f"{'mode':20} {'peak RSS MB':>12} {'vs inference':>13} {'over warm model MB':>19}")
    for r in rows:
        r["ratio"] = r["peak_mb"] / anchor
        print(f"{r['mode']:20} {r['peak_mb']:12.1f} {r['ratio']:13.3f} {r['peak_mb'] - r['loaded_mb']:19.1f}")
    sizes = upload_bytes(args.model, args.steps)
    print(
        f"upload per client-round ({args.steps} steps): adapter {sizes['weights']:,} B, seeds+scalars "
        f"{sizes['seeds']:,} B ({sizes['weights'] / sizes['seeds']:.0f}x less)"
    )
    print(json.dumps({"benchmark": "memory", "model": args.model, "rows": rows, "upload_bytes": sizes}))


if __name__ == "__main__":
    main()
