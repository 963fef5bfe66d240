"""GGUF -> safetensors: load once through transformers' ``gguf_file=`` (needs package ``gguf``), de-quantise
to float32 and save a plain Hugging Face folder that later loads in well under a second."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedlora.models.folders import save_model_folder


def convert_gguf_to_folder(gguf_path: Path, target: Path) -> Path:
    """Convert ``gguf_path`` into a safetensors folder at ``target`` (written aside, then renamed)."""
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"loading {gguf_path} needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are de-quantised already; drop the GGUF quantiser marker so the model is serialisable.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers annotates the attribute without None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return save_model_folder(target, model, tokenizer)
