"""Question: how much does fedlora's embedded engine add on top of the local training it runs?

Anchor: a bare PEFT loop doing exactly the same work (the same PEFT model, same LoRA, same encoded
batches in the same order, same AdamW steps; per client: load the global state, train, read the state
back, then a plain weighted average, loss from ``model(**batch).loss``). Engine: ``EmbeddedEngine.run`` for
the same rounds with evaluation off (it adds sampling, byte accounting of every payload, reply validation,
aggregation, metrics and an atomic checkpoint per round), once with the same Hugging Face loss
computation (the engine's overhead) and once as it runs by default (output head on target tokens only).
Prints a table and one JSON line; overhead = engine / bare - 1.

    python benchmarks/engine_overhead.py [--model smollm2-135m-instruct] [--rounds 3]
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
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

from fedlora import load_config
from fedlora.client import loss as loss_module
from fedlora.client.steps import round_seed  # noqa: E402
from fedlora.config.loader import builtin_config_path  # noqa: E402  (the demo experiment is the base)
from fedlora.data.encoding import batches_for_steps, collate  # noqa: E402
from fedlora.engine.embedded import EmbeddedEngine, sample_clients  # noqa: E402
from fedlora.models.registry import cache_root  # noqa: E402
from fedlora.runner import build_simulation  # noqa: E402
from fedlora.strategies.base import weighted_average  # noqa: E402

transformers.utils.logging.set_verbosity_error()


class BarePeftLoop:
    """The anchor: a plain PEFT + torch loop, no fedlora engine, on the very same PEFT model object (so
    that where a model's tensors happen to sit in memory cannot count for or against the engine)."""

    def __init__(self, cfg, federation, encoder, model, pad_token_id: int) -> None:
        self.cfg, self.federation, self.encoder = cfg, federation, encoder
        self.model, self.pad = model, pad_token_id
        self.global_state = {
            k: v.clone()
            for k, v in get_peft_model_state_dict(model, adapter_name=model.active_adapter).items()
        }

    def run(self, rounds: int) -> float:
        """Seconds for ``rounds`` rounds of the same sampled clients and steps as the engine."""
        cfg, model, fed = self.cfg, self.model, self.federation
        start = time.perf_counter()
        for server_round in range(1, rounds + 1):
            states, sizes = [], []
            sampled = sample_clients(
                len(fed.clients), cfg.federation.clients_per_round, cfg.federation.seed, server_round
            )
            for cid in sampled:
                set_peft_model_state_dict(model, self.global_state, adapter_name=model.active_adapter)
                encoded = self.encoder.encode_all(fed.clients[cid].train)
                gen = torch.Generator().manual_seed(round_seed(cfg.federation.seed, server_round, cid))
                params = [p for p in model.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=cfg.client.lr)
                model.train()
                for items in batches_for_steps(encoded, cfg.client.batch_size, cfg.client.local_steps, gen):
                    model(**collate(items, self.pad)).loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, cfg.client.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                model.eval()
                states.append(
                    {
                        k: v.clone()
                        for k, v in get_peft_model_state_dict(
                            model, adapter_name=model.active_adapter
                        ).items()
                    }
                )
                sizes.append(len(encoded))
            self.global_state = weighted_average(states, [n / sum(sizes) for n in sizes])
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cached = (cache_root() / "models" / "smollm2-135m-instruct").exists()
    parser.add_argument("--model", default="smollm2-135m-instruct" if cached else "tiny-llama")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per timed block (two blocks per path)")
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
    cfg = load_config(builtin_config_path(), overrides)
    sim, _ = build_simulation(cfg)
    bare = BarePeftLoop(
        cfg, sim.federation, sim.encoder, sim.adapters.model, sim.encoder.tokenizer.pad_token_id
    )
    lm_class = type(sim.adapters.model.get_base_model())
    with tempfile.TemporaryDirectory() as tmp:
        engine = EmbeddedEngine(sim, Path(tmp))

        def run_engine(head_on_targets: bool) -> float:
            loss_module._FAST_PATH_AGREES[lm_class] = head_on_targets
            started = time.perf_counter()
            engine.run(1, lambda record: None)  # whole rounds, each with its atomic checkpoint
            return time.perf_counter() - started

        bare.run(1)  # warm-up of every path, untimed
        run_engine(False)
        # A B C C B A order, so that drift of the machine over time falls on every path alike
        times = {"bare": bare.run(args.rounds), "standard": run_engine(False), "fast": run_engine(True)}
        times["fast"] += run_engine(True)
        times["standard"] += run_engine(False)
        times["bare"] += bare.run(args.rounds)
    n_rounds = 2 * args.rounds
    rows = [
        ("bare PEFT loop (anchor)", "bare"),
        ("engine, HF loss (same math)", "standard"),
        ("engine, default (head on targets)", "fast"),
    ]
    print(
        f"model {args.model}, {n_rounds} rounds per path x {args.clients_per_round} clients x "
        f"{args.local_steps} steps, 1 thread"
    )
    print(f"{'what':36} {'total s':>9} {'s/round':>9} {'vs bare':>8}")
    for name, key in rows:
        print(f"{name:36} {times[key]:9.2f} {times[key] / n_rounds:9.2f} {times[key] / times['bare']:8.3f}")
    overhead = times["standard"] / times["bare"] - 1
    print(
        f"engine overhead (same loss computation): {100 * overhead:+.1f}%; default engine vs bare: {times['fast'] / times['bare']:.3f}x time"
    )
    result = {
        "benchmark": "engine_overhead",
        "model": args.model,
        "rounds": n_rounds,
        "clients_per_round": args.clients_per_round,
        "local_steps": args.local_steps,
        "bare_seconds": round(times["bare"], 3),
        "engine_standard_loss_seconds": round(times["standard"], 3),
        "engine_default_seconds": round(times["fast"], 3),
        "overhead_ratio": round(times["standard"] / times["bare"], 4),
        "overhead_pct": round(100 * overhead, 2),
        "default_ratio": round(times["fast"] / times["bare"], 4),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
