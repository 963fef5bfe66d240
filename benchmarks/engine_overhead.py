"""Question: how much does fedlora's embedded engine add on top of the local training it runs?

Anchor: a bare PEFT loop doing exactly the same work (same base model, same LoRA, same pre-encoded
batches in the same order, same AdamW steps; per client: load the global state, train, read the state
back, then a plain weighted average). Engine: ``EmbeddedEngine.run`` for the same rounds with evaluation
off (it adds sampling, byte accounting of every payload, reply validation, aggregation, metrics and an
atomic checkpoint per round). Prints a table and one JSON line; overhead = engine / bare - 1.

    python benchmarks/engine_overhead.py [--model smollm2-135m-instruct] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

from fedlora.client.trainer import round_seed  # noqa: E402
from fedlora.config import load_config  # noqa: E402
from fedlora.data.encoding import batches_for_steps, collate  # noqa: E402
from fedlora.engine.embedded import EmbeddedEngine, sample_clients  # noqa: E402
from fedlora.models import load_base_model  # noqa: E402
from fedlora.models.registry import cache_root  # noqa: E402
from fedlora.runner import build_simulation  # noqa: E402
from fedlora.strategies.base import weighted_average  # noqa: E402

transformers.utils.logging.set_verbosity_error()


def bare_peft_rounds(cfg, federation, encoder, rounds: int) -> list[float]:
    """The anchor: plain PEFT + torch, no fedlora engine. Returns seconds per round."""
    bundle = load_base_model(cfg.model)
    torch.manual_seed(cfg.adapter.init_seed)
    model = get_peft_model(
        bundle.model,
        LoraConfig(
            r=cfg.adapter.rank,
            lora_alpha=cfg.adapter.alpha,
            lora_dropout=cfg.adapter.dropout,
            target_modules=cfg.adapter.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    global_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    pad = bundle.tokenizer.pad_token_id
    per_round = cfg.federation.clients_per_round
    times = []
    for server_round in range(1, rounds + 1):
        start = time.perf_counter()
        states, sizes = [], []
        for cid in sample_clients(len(federation.clients), per_round, cfg.federation.seed, server_round):
            set_peft_model_state_dict(model, global_state)
            encoded = encoder.encode_all(federation.clients[cid].train)
            gen = torch.Generator().manual_seed(round_seed(cfg.federation.seed, server_round, cid))
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=cfg.client.lr)
            model.train()
            for items in batches_for_steps(encoded, cfg.client.batch_size, cfg.client.local_steps, gen):
                model(**collate(items, pad)).loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.client.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            model.eval()
            states.append({k: v.clone() for k, v in get_peft_model_state_dict(model).items()})
            sizes.append(len(encoded))
        global_state = weighted_average(states, [n / sum(sizes) for n in sizes])
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_model = (
        "smollm2-135m-instruct"
        if (cache_root() / "models" / "smollm2-135m-instruct").exists()
        else "tiny-llama"
    )
    parser.add_argument("--model", default=default_model)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients-per-round", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = [
        f"model.name={args.model}",
        f"federation.rounds={args.rounds}",
        f"federation.clients_per_round={args.clients_per_round}",
        f"client.local_steps={args.local_steps}",
        "eval.metrics=[]",
        "output.plot=false",
    ]
    cfg = load_config(None, overrides)
    sim, _ = build_simulation(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        engine = EmbeddedEngine(sim, Path(tmp))
        started = time.perf_counter()
        engine.run(1, lambda record: None)  # whole rounds, each with its atomic checkpoint
        total_engine = time.perf_counter() - started
    bare = bare_peft_rounds(cfg, sim.federation, sim.encoder, args.rounds)
    total_bare = sum(bare)
    ratio = total_engine / total_bare
    rows = [
        ("bare PEFT loop (anchor)", total_bare, statistics.median(bare)),
        ("fedlora embedded engine", total_engine, total_engine / args.rounds),
    ]
    print(
        f"model {args.model}, {args.rounds} rounds x {args.clients_per_round} clients x {args.local_steps} steps, 1 thread"
    )
    print(f"{'what':28} {'total s':>9} {'s/round':>9}")
    for name, total, per in rows:
        print(f"{name:28} {total:9.2f} {per:9.2f}")
    print(f"engine / bare = {ratio:.3f}  (overhead {100 * (ratio - 1):+.1f}%)")
    print(
        json.dumps(
            {
                "benchmark": "engine_overhead",
                "model": args.model,
                "rounds": args.rounds,
                "clients_per_round": args.clients_per_round,
                "local_steps": args.local_steps,
                "bare_seconds": round(total_bare, 3),
                "engine_seconds": round(total_engine, 3),
                "ratio": round(ratio, 4),
                "overhead_pct": round(100 * (ratio - 1), 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
