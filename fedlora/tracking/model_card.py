"""The model card (``README.md``) written beside every exported adapter or model: what PEFT's own card holds
(the base model, ``library_name``, the ``base_model:adapter:`` tag, how to load it) and what a federated run
adds (the method and its options, clients and rounds, the data, local training, privacy, the final figures,
the fedlora version). Hugging Face's hub reads its YAML front matter."""

from __future__ import annotations

from typing import Any

import yaml

from fedlora.config.schema import ExperimentConfig
from fedlora.version import __version__

#: the record's figures a card lists (when present), in this order
CARD_FIGURES = (
    "train_loss",
    "eval_loss",
    "eval_perplexity",
    "eval_accuracy",
    "eval_macro_f1",
    "eval_rouge_l",
    "eval_exact_match",
    "eval_task_score",
    "epsilon_max",
    "epsilon_client",
)


def model_card(
    cfg: ExperimentConfig,
    base_model: str,
    records: list[dict[str, Any]],
    data: str,
    num_clients: int,
    is_adapter: bool = True,
) -> str:
    """The card's Markdown text. ``base_model``: the hub id (or local folder) the adapter applies to;
    ``records``: the rounds done so far (``metrics.jsonl``); ``data``: the federation's description."""
    classification = cfg.model.task == "classification"
    front = {
        "base_model": base_model,
        "library_name": "peft" if is_adapter else "transformers",
        "pipeline_tag": "text-classification" if classification else "text-generation",
        "tags": [
            *([f"base_model:adapter:{base_model}", "lora"] if is_adapter else []),
            "fedlora",
            "federated-learning",
            cfg.strategy.name,
        ],
    }
    client = cfg.client
    steps = f"{client.local_steps} steps" if client.local_steps else f"{client.local_epochs} epochs"
    dp = cfg.privacy
    noise = (
        f"target epsilon {dp.target_epsilon:g}"
        if dp.target_epsilon
        else f"noise multiplier {dp.noise_multiplier}"
    )
    privacy = "off"
    if dp.dp_sgd:
        privacy = f"DP-SGD per client ({noise}, delta {dp.delta:g}; epsilon_max per round below)"
    elif dp.client_level:
        clipping = "adaptive clipping" if dp.adaptive_clipping else f"updates clipped to {dp.clipping_norm:g}"
        privacy = f"client-level DP-FedAvg ({noise}, delta {dp.delta:g}, {clipping}; epsilon_client per round below)"
    adapter = cfg.adapter
    scale = f"scale {adapter.scale:g}" if adapter.scale is not None else f"alpha {adapter.alpha:g}"
    per_round = cfg.federation.clients_per_round or (
        f"{cfg.federation.fraction:g} of them" if cfg.federation.fraction else "all"
    )
    options = ", ".join(f"{k}={v}" for k, v in cfg.strategy.options.items()) or "defaults"
    rows = [
        ("base model", f"`{base_model}`"),
        ("method", f"{cfg.strategy.name} (options: {options})"),
        ("clients", f"{num_clients} ({per_round} per round)"),
        ("rounds", f"{len(records)} of {cfg.federation.rounds}"),
        ("data", data),
        (
            "adapter",
            f"{'rsLoRA' if adapter.use_rslora else 'LoRA'} rank {adapter.rank}, {scale}, on {adapter.target_modules}",
        ),
        ("local training", f"{client.optimizer}, lr {client.lr:g}, {steps} of batch {client.batch_size}"),
        ("privacy", privacy),
        ("fedlora", __version__),
    ]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [
        f"# {cfg.name}",
        "",
        f"Trained with fedlora by federated fine-tuning ({cfg.strategy.name}).",
        "",
    ]
    lines += ["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), ""]
    last = records[-1] if records else {}
    figures = [(k, last[k]) for k in CARD_FIGURES if isinstance(last.get(k), (int, float))]
    if figures:
        lines += [f"## Final figures (round {last.get('round')})", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in figures]
        lines += ["", "Every round's figures are in the run folder's `metrics.jsonl`.", ""]
    auto = "AutoModelForSequenceClassification" if classification else "AutoModelForCausalLM"
    load = (
        [
            f'base = {auto}.from_pretrained("{base_model}")',
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        ]
        if is_adapter
        else [f'model = {auto}.from_pretrained("path/to/this/folder")']
    )
    imports = [
        f"from transformers import {auto}, AutoTokenizer",
        *(["from peft import PeftModel"] if is_adapter else []),
    ]
    lines += ["## Use", "", "```python", *imports, "", *load]
    lines += ['tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", ""]
    return "\n".join(lines)
