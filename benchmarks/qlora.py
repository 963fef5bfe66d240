"""Question: what does ``model.quantization`` (QLoRA-style 4-bit NF4, or 8-bit) save and cost on this machine?

Each setting runs in a fresh child process that loads SmolLM2-135M-Instruct (float32 compute) with LoRA r=8 on
q/k/v/o, warms up once, resets the peak-RSS mark, then trains one client for ``--steps`` AdamW steps through
``train_locally`` on 4 reasoning-gym examples (max 128 tokens). Reported per setting: the base model's weight
bytes (``get_memory_footprint``), the process's peak resident set during training, seconds per step, and the
first batch's loss (what quantization does to the model's output before any training); ratios against the
float32 base measured in the same run (the anchor).

    python benchmarks/qlora.py [--model smollm2-135m-instruct] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

from memory import _status_kb

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

SETTINGS = (None, 8, 4)


def measure(bits: int | None, model_name: str, steps: int, queue: mp.Queue) -> None:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    from fedlora.adapters.lora import LoraAdapters
    from fedlora.client.loss import batch_loss
    from fedlora.client.settings import LocalTrainingSettings
    from fedlora.client.trainer import train_locally
    from fedlora.config.schema import AdapterConfig, ModelConfig
    from fedlora.data.encoding import Encoder, collate
    from fedlora.data.examples import ClientData
    from fedlora.data.sources import reasoning_gym_examples
    from fedlora.models.loading import load_base_model

    bundle = load_base_model(ModelConfig(name=model_name, quantization=bits))
    weight_mb = bundle.model.get_memory_footprint() / 2**20
    adapters = LoraAdapters(bundle.model, AdapterConfig(rank=8, dropout=0.0), "causal-lm")
    state = adapters.initial_state()
    encoder = Encoder(bundle.tokenizer, "causal-lm", 128)
    examples = reasoning_gym_examples(["basic_arithmetic"], 4, seed=0)
    batch = collate(encoder.encode_all(examples), bundle.tokenizer.pad_token_id)
    adapters.load(state)
    with torch.no_grad():
        first_loss = float(batch_loss(adapters.model, batch, "causal-lm"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark
    settings = LocalTrainingSettings(optimizer="adamw", lr=1e-4, local_steps=steps, batch_size=4)
    started = time.perf_counter()
    train_locally(adapters, encoder, ClientData(0, "c", examples, [], []), state, settings, 1)
    seconds = (time.perf_counter() - started) / steps
    queue.put(
        {
            "quantization": "float32" if bits is None else f"{bits}-bit",
            "weights_mb": weight_mb,
            "peak_mb": _status_kb("VmHWM") / 1024,
            "s_per_step": seconds,
            "loss_before_training": first_loss,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for bits in SETTINGS:
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(bits, args.model, args.steps, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    anchor = rows[0]
    print(f"{args.model}, LoRA r=8 on q/k/v/o, batch 4 x <=128 tokens, AdamW, 1 thread, CPU")
    print(
        f"{'base':9} {'weights MB':>11} {'x':>6} {'peak RSS MB':>12} {'x':>6} {'s/step':>8} {'x':>6} {'loss':>8}"
    )
    for r in rows:
        r["weights_ratio"] = r["weights_mb"] / anchor["weights_mb"]
        r["peak_ratio"] = r["peak_mb"] / anchor["peak_mb"]
        r["time_ratio"] = r["s_per_step"] / anchor["s_per_step"]
        print(
            f"{r['quantization']:9} {r['weights_mb']:11.1f} {r['weights_ratio']:6.2f} {r['peak_mb']:12.1f} "
            f"{r['peak_ratio']:6.2f} {r['s_per_step']:8.3f} {r['time_ratio']:6.2f} {r['loss_before_training']:8.4f}"
        )
    print(json.dumps({"benchmark": "qlora", "model": args.model, "rows": rows}))


if __name__ == "__main__":
    main()
