"""A run's adapters out as plain PEFT folders (or a whole model folder), and the end of a run."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedlora.adapters.export import export_full_model, export_peft_adapter
from fedlora.config.schema import ExperimentConfig
from fedlora.engine.run_folder import (
    replace_folder,
)
from fedlora.engine.transport import Simulation
from fedlora.errors import ConfigError
from fedlora.models.loading import ModelBundle, load_base_model
from fedlora.session.resume import load_run_config
from fedlora.tracking.model_card import model_card
from fedlora.tracking.report import plot_curves, summary_table


def export_adapter(
    folder: Path,
    cfg: ExperimentConfig,
    sim: Simulation,
    bundle: ModelBundle,
    records: list[dict[str, Any]] | None = None,
) -> dict[str, torch.Tensor]:
    """The strategy's current evaluation adapter as a plain PEFT folder (full-parameter runs: a whole model
    folder) at ``folder``, with the tokenizer and a model card (``records``: the rounds so far), built aside
    and then renamed (never half written); returns what was exported."""
    state = sim.server.evaluation_state()
    if sim.client_models is not None:  # exported for the first architecture (each client's model: personal/)
        state = sim.client_models.to_variant(state, 0)
        state = {k: v for k, v in state.items() if ".lora_" in k}  # the adapter, not local weights
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(building, ignore_errors=True)
    local = str(bundle.folder.resolve())
    if sim.adapters.is_full_state(state):
        export_full_model(state, building, local)
    else:
        export_peft_adapter(sim.adapters, state, building, local, bundle.base_model_id)
    is_adapter = (building / "adapter_config.json").exists()
    if is_adapter:
        bundle.tokenizer.save_pretrained(str(building))
    card = model_card(
        cfg,
        bundle.base_model_id,
        records or [],
        sim.federation.description,
        len(sim.federation.clients),
        is_adapter,
    )
    (building / "README.md").write_text(card, encoding="utf-8")
    replace_folder(building, folder)
    return state


def finalize(
    run_dir: Path,
    cfg: ExperimentConfig,
    sim: Simulation,
    bundle: ModelBundle,
    records: list[dict[str, Any]],
    console: Console,
) -> dict[str, torch.Tensor]:
    """Export the global adapter as a PEFT folder (full-parameter runs: a whole model folder), plot the
    curves, print the summary."""
    final_state = export_adapter(run_dir / "global", cfg, sim, bundle, records)
    if cfg.eval.tasks:
        from fedlora.session.evaluate import benchmark_state

        if sim.client_models is not None:
            console.print("eval.tasks: skipped, a personalised run has no one global model to score")
        else:
            console.print(f"scoring the benchmarks {', '.join(cfg.eval.tasks)} (eval/tasks.json)")
            benchmark_state(
                run_dir,
                sim,
                final_state,
                cfg.eval.tasks,
                cfg.eval.tasks_limit,
                cfg.eval.tasks_fewshot,
                cfg.eval.tasks_base,
                sys.stderr,
            )
    if cfg.output.plot:
        plot_curves(records, run_dir / "curves.png", f"{cfg.name} ({cfg.strategy.name})")
    console.print(summary_table(records, f"{cfg.name}: {cfg.strategy.name}, {len(records)} rounds"))
    for line in sim.server.report():
        console.print(line)
    up = sum(r.get("bytes_up", 0) for r in records)
    down = sum(r.get("bytes_down", 0) for r in records)
    console.print(
        f"total bytes up {up:,}  down {down:,}; run directory: [bold]{run_dir}[/] (global adapter in global/)"
    )
    return final_state


def global_export(run_dir: Path) -> tuple[Path, str]:
    """The run's exported global model: (``RUN/global``, ``"adapter"`` for a PEFT adapter folder or
    ``"model"`` for a whole model folder); ConfigError when ``run_dir`` is no finished run."""
    folder = run_dir / "global"
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    if (folder / "model.safetensors").exists():
        return folder, "model"
    if (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists():
        return folder, "adapter"
    what = "a run that has not finished" if (run_dir / "config.yaml").exists() else "not a run directory"
    raise ConfigError(
        f"{run_dir}: no exported global adapter in {folder} ({what}); finish it with `fedlora run --resume "
        f"{run_dir}`, or name a run folder that holds global/"
    )


def export_merged(run_dir: Path, out: Path, dtype: str | None = None) -> Path:
    """Load the base model, merge the global adapter into it with plain PEFT (``merge_and_unload``), save
    full weights and the tokenizer to ``out`` in ``dtype`` (default: the run's ``model.dtype``).

    A 4-bit or 8-bit base (QLoRA) is dequantised first (``PreTrainedModel.dequantize``): the adapter was
    trained against the dequantised NF4 / int8 weights, and merging into the quantised layers would quantise
    the merged update again and lose most of it. The merged model holds W_deq + s B A in full precision."""
    from peft import PeftModel

    global_export(run_dir)
    cfg = load_run_config(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    bundle = load_base_model(
        cfg.model,
        num_labels=len(info["label_names"]) if info["label_names"] else None,
        head_seed=cfg.adapter.init_seed,
    )
    model = bundle.model
    if cfg.model.quantization is not None:
        model = model.dequantize()
    model = model.to(getattr(torch, dtype or cfg.model.dtype))
    merged = PeftModel.from_pretrained(model, str(run_dir / "global")).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    bundle.tokenizer.save_pretrained(str(out))
    return out
