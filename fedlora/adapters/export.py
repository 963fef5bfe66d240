"""A trained adapter out of fedlora: a plain PEFT adapter folder (what ``PeftModel.from_pretrained`` loads),
a merged model folder (W0 + D + s B A on every target module: FLoRA / FedEx-LoRA's base offset folded in), or a
whole model folder of full-parameter weights."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedlora.adapters.lora import LoraAdapters
from fedlora.adapters.merged import split_merged
from fedlora.adapters.state import AdapterState
from fedlora.compute import to_cpu, weight_of


def export_peft_adapter(
    adapters: LoraAdapters,
    state: AdapterState,
    folder: Path,
    base_model_path: str,
    base_model_id: str | None = None,
) -> Path:
    """Write ``state`` as a standard PEFT adapter folder that ``PeftModel.from_pretrained`` loads; its config
    names ``base_model_id`` (the hub id the base came from) as ``base_model_name_or_path``, else the local
    ``base_model_path``.

    The adapter config is the slot's own PEFT config (so task heads PEFT saves, e.g. ``score``, match).
    A state with a merged base offset (:mod:`fedlora.adapters.merged`) is written as a whole merged model
    folder instead (:func:`export_merged_model`).
    """
    if split_merged(state)[1]:
        return export_merged_model(adapters, state, folder, base_model_path)

    adapters.load(state)  # activates the state's rank slot
    assert adapters.model is not None
    config = copy.deepcopy(adapters.model.peft_config[adapters.active_slot_name])
    config.base_model_name_or_path = base_model_id or base_model_path
    config.inference_mode = True
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def export_merged_model(
    adapters: LoraAdapters, state: AdapterState, folder: Path, base_model_path: str
) -> Path:
    """A plain Hugging Face model folder of W0 + D + s B A on every target module (the base offset and
    the adapter of ``state`` merged in), every other weight the base model's."""
    adapters.load(state)
    prefix = "base_model.model."
    weights: dict[str, torch.Tensor] = dict(adapters.base_parameters())
    with torch.no_grad():
        slot = adapters.active_slot_name
        for path, (layer, _, _) in adapters.lora_modules().items():
            A, B = weight_of(layer.lora_A[slot]), weight_of(layer.lora_B[slot])
            rank = A.shape[0]
            key = path.removeprefix(prefix) + ".base_layer.weight"
            weights[key] = weights[key] + adapters.scaling(rank) * (B @ A)
    return export_full_model(to_cpu(weights), folder, base_model_path)


def export_full_model(state: AdapterState, folder: Path, base_model_path: str) -> Path:
    """Write full-parameter weights as a plain Hugging Face model folder (config, tokenizer, safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = Path(base_model_path)
    for item in base.iterdir():
        if (
            item.is_file()
            and not item.name.endswith((".safetensors", ".bin"))
            and item.name != "model.safetensors.index.json"
        ):
            shutil.copy2(item, folder / item.name)
    tensors = {k.replace(".base_layer", ""): v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
