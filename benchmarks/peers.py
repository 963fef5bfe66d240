"""Question: how much faster is a federated round the fedlora way than the way OpenFedLLM and FlowerTune's
templates run it (a TRL ``SFTTrainer``, or a Hugging Face ``Trainer``, built for every client in every
round), at the same result?

The same round for every way: the built-in default experiment (FedIT: SmolLM2-135M-Instruct, LoRA r=8 on the
attention projections, reasoning-gym, 4 clients a round, 4 AdamW steps of batch 4, constant lr 5e-4, gradient
clipping at 1), the same sampled clients, the same batches in the same order (fedlora's seeded draw; the
peers' trainers read them with a sequential sampler), the same initial adapter, example-weighted FedAvg of
the LoRA factors, LoRA dropout 0 (so that the ways can agree), and the held-out loss of the final global
adapter measured by one evaluation for all. The peers' way, as in OpenFedLLM's ``main_sft.py`` and FlowerTune's
``client_app.py``: one ``get_peft_model`` model; each round, for each sampled client,
``set_peft_model_state_dict`` with the global adapter, a new trainer (``SFTConfig`` / ``TrainingArguments``:
``max_steps``, ``per_device_train_batch_size``, constant lr, ``adamw_torch``, ``max_grad_norm``, fp32: TRL's
default bf16 is turned off, as every way computes in fp32), ``train()``,
``get_peft_model_state_dict``; then the server average. Each way runs in its own process with every core.

Seconds per round: each round's wall time, training and aggregation (fedlora's engine ``seconds``; the
peers' loop timed the same way), mean over the rounds; the first round separately (start-up and warm caches).

    python benchmarks/peers.py [--rounds 3] [--ways fedlora,fedlora-1-worker,sft-trainer,hf-trainer] [-o KEY=VALUE ...]

``-o`` overrides go to every way's experiment (another model or data, e.g. on a GPU machine; ``compute.device:
auto`` puts fedlora on the GPU, and the peers' trainers go there by themselves).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from children import report, run_self

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
COMMON = ["adapter.dropout=0.0", "client.optimizer=adamw", "output.plot=false"]
WAYS = {
    "fedlora": [],  # the default: compute.workers auto
    "fedlora-1-worker": ["compute.workers=1", f"client.num_threads={CORES}"],
    "sft-trainer": [],
    "hf-trainer": [],
}


def experiment(rounds: int, extra: list[str]):  # noqa: ANN201 (fedlora imported in the child only)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedlora import load_config

    path = Path(__file__).resolve().parents[1] / "fedlora" / "config" / "builtin" / "default.yaml"
    return load_config(path, [f"federation.rounds={rounds}", f"eval.every={rounds}", *COMMON, *extra])


def run_fedlora(way: str, rounds: int, folder: Path, overrides: list[str]) -> dict:
    from fedlora.runner import run

    result = run(experiment(rounds, [*overrides, *WAYS[way]]), folder, show_progress=False)
    seconds = [r["seconds"] for r in result.records]
    return {"way": way, "seconds": seconds, "eval_loss": result.records[-1]["eval_loss"]}


def run_peer(way: str, rounds: int, folder: Path, overrides: list[str]) -> dict:
    """The peers' loop: a trainer per client per round around one PEFT model (module docstring)."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from fedlora.client.steps import round_seed
    from fedlora.data.encoding import EncodedOnDemand, batches_for_steps, collate
    from fedlora.engine.evaluation import evaluate_state
    from fedlora.engine.sampling import clients_per_round, sample_clients
    from fedlora.runner import build_simulation

    torch.set_num_threads(CORES)
    cfg = experiment(rounds, overrides)
    sim, bundle = build_simulation(cfg)  # fedlora's data, batches, initial adapter and evaluation only
    clients = sim.federation.clients
    per_round = clients_per_round(cfg.federation, len(clients))
    model = AutoModelForCausalLM.from_pretrained(bundle.folder)
    lora = LoraConfig(
        r=cfg.adapter.rank,
        lora_alpha=cfg.adapter.alpha,
        lora_dropout=0.0,
        target_modules=cfg.adapter.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    global_state = {k: v.clone() for k, v in sim.adapters.initial_state().items()}
    pad = sim.encoder.tokenizer.pad_token_id

    class Sequential:  # the peers' trainer, reading the client's batches in fedlora's order
        def _get_train_sampler(self, *args: object, **kwargs: object) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)

    if way == "sft-trainer":
        from trl import SFTConfig, SFTTrainer

        trainer_class, config_class = type("SeqSFT", (Sequential, SFTTrainer), {}), SFTConfig
    else:
        trainer_class, config_class = type("SeqTrainer", (Sequential, Trainer), {}), TrainingArguments
    seconds = []
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        states, sizes = [], []
        for client_id in sample_clients(len(clients), per_round, cfg.federation.seed, server_round):
            client = clients[client_id]
            seed = round_seed(cfg.federation.seed, server_round, client_id)
            encoded = EncodedOnDemand(sim.encoder, client.train)
            steps = cfg.client.local_steps
            batches = batches_for_steps(
                encoded, cfg.client.batch_size, steps, torch.Generator().manual_seed(seed)
            )
            assert all(len(b) == cfg.client.batch_size for b in batches), (
                "a short batch would shift the others"
            )
            rows = [item for batch in batches for item in batch]
            if way == "sft-trainer":  # TRL's pre-tokenised form: the loss on the completion tokens
                rows = [
                    {"input_ids": r["input_ids"], "completion_mask": [int(t != -100) for t in r["labels"]]}
                    for r in rows
                ]
                collator = None
            else:
                rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
                collator = lambda items: collate(items, pad)  # noqa: E731
            set_peft_model_state_dict(model, global_state)
            args = dict(
                output_dir=str(folder / "trainer"),
                max_steps=steps,
                per_device_train_batch_size=cfg.client.batch_size,
                learning_rate=cfg.client.lr,
                lr_scheduler_type="constant",
                weight_decay=0.0,
                max_grad_norm=cfg.client.grad_clip,
                optim="adamw_torch",
                logging_steps=steps,
                save_strategy="no",
                report_to="none",
                seed=seed % 2**32,
                use_cpu=not torch.cuda.is_available(),
                dataloader_num_workers=0,
                disable_tqdm=True,
                bf16=False,  # TRL's SFTConfig turns bf16 on by default; the same fp32 round for every way
                fp16=False,
            )
            if way == "sft-trainer":
                args |= {"max_length": cfg.data.max_seq_len, "completion_only_loss": True}
            else:
                args |= {"remove_unused_columns": False}
            trainer = trainer_class(
                model=model,
                args=config_class(**args),
                train_dataset=datasets.Dataset.from_list(rows),
                data_collator=collator,
                **({"processing_class": sim.encoder.tokenizer} if way == "sft-trainer" else {}),
            )
            trainer.train()
            states.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})
            sizes.append(len(client.train))
        total = sum(sizes)
        global_state = {
            k: sum(s[k] * (n / total) for s, n in zip(states, sizes, strict=True)) for k in states[0]
        }
        seconds.append(time.perf_counter() - started)
    metrics = evaluate_state(sim, global_state, clients, ["loss"])
    return {"way": way, "seconds": seconds, "eval_loss": metrics["eval_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("-o", "--override", action="append", default=[], help="config override, every way")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            runner = run_fedlora if args.one.startswith("fedlora") else run_peer
            figures = runner(args.one, args.rounds, Path(tmp) / "run", args.override)
        report(figures)
        return
    rows = []
    for way in args.ways.split(","):
        row = run_self(__file__, way, args.rounds, args.override)
        if row is None:
            continue
        row["s_per_round"] = sum(row["seconds"]) / len(row["seconds"])
        later = row["seconds"][1:] or row["seconds"]
        row["s_per_later_round"] = sum(later) / len(later)
        rows.append(row)
        print(f"  {way}: {row['s_per_round']:.2f} s/round", file=sys.stderr, flush=True)
    fedlora = next((r for r in rows if r["way"] == "fedlora"), None)
    print(
        f"one FedIT round of the default experiment, the fedlora way and the peers', {args.rounds} rounds, {CORES} cores"
    )
    print(
        f"{'way':18} {'s/round':>8} {'round 1 s':>10} {'later s':>8} {'fedlora faster':>15} {'held-out loss':>14}"
    )
    for r in rows:
        r["fedlora_speedup"] = r["s_per_round"] / fedlora["s_per_round"] if fedlora else None
        print(
            f"{r['way']:18} {r['s_per_round']:8.2f} {r['seconds'][0]:10.2f} {r['s_per_later_round']:8.2f} "
            f"{(r['fedlora_speedup'] or 0):14.2f}x {r['eval_loss']:14.4f}"
        )
    print(json.dumps({"benchmark": "peers", "rounds": args.rounds, "cores": CORES, "rows": rows}))


if __name__ == "__main__":
    main()
