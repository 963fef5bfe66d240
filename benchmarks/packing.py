"""Question: how much does ``data.packing`` save per training step, and is the loss unchanged?

SmolLM2-135M-Instruct (float32, chat template) with LoRA r=8 on q/k/v/o; batches of ``--batch`` examples drawn
from reasoning-gym tasks of different lengths (the lengths vary as in a real instruction mix); each batch
is trained once padded (one row per example, the anchor) and once packed into rows of ``--max-seq-len``
(block-diagonal attention). Reported: token slots in the batch tensor (what the model computes on), rows,
seconds per forward+backward step, and the largest relative difference between the two losses.

    python benchmarks/packing.py [--batch 8] [--max-seq-len 512] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

TASKS = ["basic_arithmetic", "chain_sum", "gcd", "lcm", "letter_counting", "word_sorting"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from fedlora.adapters.lora import LoraAdapters
    from fedlora.client.loss import batch_loss
    from fedlora.config.schema import AdapterConfig, ModelConfig
    from fedlora.data.encoding import Encoder, collate
    from fedlora.data.sources import reasoning_gym_examples
    from fedlora.models.loading import load_base_model

    bundle = load_base_model(ModelConfig(name=args.model))
    adapters = LoraAdapters(bundle.model, AdapterConfig(rank=8, dropout=0.0), "causal-lm")
    adapters.load(adapters.initial_state())
    model = adapters.model
    params = [p for _, p in adapters.trainable_parameters()]
    encoder = Encoder(bundle.tokenizer, "causal-lm", args.max_seq_len, packing=True)
    examples = reasoning_gym_examples(TASKS, -(-args.batch * args.steps // len(TASKS)), seed=0)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    items = encoder.encode_all([examples[i] for i in order])
    totals = {"padded": [0, 0, 0.0], "packed": [0, 0, 0.0]}  # slots, rows, seconds
    worst = 0.0
    batch_loss(model, collate(items[:2], bundle.tokenizer.pad_token_id), "causal-lm")  # warm-up
    for step in range(args.steps):
        chunk = items[step * args.batch : (step + 1) * args.batch]
        losses = {}
        for name, batch in (
            ("padded", collate(chunk, bundle.tokenizer.pad_token_id)),
            ("packed", encoder.training_batch(chunk)),
        ):
            started = time.perf_counter()
            loss = batch_loss(model, batch, "causal-lm")
            torch.autograd.grad(loss, params)
            totals[name][2] += time.perf_counter() - started
            totals[name][0] += batch["input_ids"].numel()
            totals[name][1] += batch["input_ids"].shape[0]
            losses[name] = float(loss)
        worst = max(worst, abs(losses["packed"] - losses["padded"]) / abs(losses["padded"]))
    real = sum(len(item["input_ids"]) for item in items[: args.steps * args.batch])
    print(
        f"{args.model}, LoRA r=8, {args.steps} batches of {args.batch} reasoning-gym examples "
        f"({real} real tokens), max_seq_len {args.max_seq_len}, {torch.get_num_threads()} threads"
    )
    print(f"{'batch':8} {'token slots':>12} {'rows':>6} {'s/step':>8} {'speed-up':>9}")
    rows = []
    for name, (slots, nrows, seconds) in totals.items():
        rows.append(
            {
                "batch": name,
                "token_slots": slots,
                "rows": nrows,
                "s_per_step": seconds / args.steps,
                "speedup": totals["padded"][2] / seconds,
            }
        )
        print(
            f"{name:8} {slots:12d} {nrows:6d} {seconds / args.steps:8.3f} {totals['padded'][2] / seconds:9.2f}"
        )
    print(f"largest relative loss difference packed vs padded: {worst:.2e}")
    print(
        json.dumps(
            {
                "benchmark": "packing",
                "model": args.model,
                "real_tokens": real,
                "rows": rows,
                "max_rel_loss_diff": worst,
            }
        )
    )


if __name__ == "__main__":
    main()
