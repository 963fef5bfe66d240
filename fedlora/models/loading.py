"""Loading the base model and its tokenizer for either task (causal LM or sequence classification)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedlora.compute import resolve_device
from fedlora.config.loader import HUB_ID
from fedlora.config.schema import ComputeConfig, ModelConfig
from fedlora.errors import ConfigError
from fedlora.models.convert import convert_gguf_to_folder
from fedlora.models.registry import BUILTIN_HUB_IDS, BUILTIN_NAMES, cache_root, fetch_builtin
from fedlora.models.tiny import tiny_llama_folder
from fedlora.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class ModelBundle:
    """A loaded base model, its tokenizer, and the local folder it came from (the PEFT ``base_model``)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    task: str
    folder: Path
    num_labels: int | None = None
    #: where the weights came from, as a PEFT adapter names its base: a hub id (a built-in's source, or
    #: model.name given as one), else the local folder
    source: str = ""

    @property
    def base_model_id(self) -> str:
        return self.source or str(self.folder.resolve())


ModelSource = Callable[[ModelConfig], Path]
#: model.name -> fn(model config) -> a local Hugging Face folder (config.json, weights, tokenizer)
MODELS: Registry[ModelSource] = Registry("model", "model.name")


def register_model(name: str) -> Callable[[ModelSource], ModelSource]:
    """Decorator: ``fn(model_cfg) -> Path`` of a local Hugging Face model folder (fetch or build it once)."""
    return MODELS.register(name)


@register_model("tiny-llama")
def tiny_llama(cfg: ModelConfig) -> Path:
    return tiny_llama_folder(cache_root(cfg.cache_dir), cfg.tiny_hidden_size, cfg.tiny_num_layers)


def builtin_source(name: str) -> ModelSource:
    """The model source of a built-in name: fetched once into the cache (``fedlora fetch``)."""

    def source(cfg: ModelConfig) -> Path:
        return fetch_builtin(name, cfg.cache_dir)

    return source


for _name in BUILTIN_NAMES:
    if _name not in MODELS:
        MODELS.register(_name, builtin_source(_name))


def hub_model_folder(repo_id: str) -> Path:
    """A Hugging Face hub model id from the local Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError, or a partial cache entry
        raise FileNotFoundError(
            f"model.name: {repo_id!r} is not in the local Hugging Face cache ({HF_HUB_CACHE}): on a machine with "
            f"network run `hf download {repo_id}` and copy that cache here (or set HF_HOME to it), or give "
            f"model.name as a model folder ({type(err).__name__})"
        ) from None


def resolve_model_folder(cfg: ModelConfig) -> Path:
    """Turn ``model.name`` into a local Hugging Face folder: a registered model (built-ins: tiny-llama,
    smollm2-135m-instruct, all-minilm-l6-v2), a ``.gguf`` file (converted once), a model folder, or a hub id
    (``org/name``) already in the local Hugging Face cache."""
    name = cfg.name
    if name in MODELS:
        return MODELS.get(name)(cfg)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model.name: GGUF file not found: {path}")
        target = cache_root(cfg.cache_dir) / "gguf" / f"{path.stem}-{path.stat().st_size}"
        if not (target / "config.json").exists():
            log.info("converting %s to safetensors in %s (once)", path, target)
            convert_gguf_to_folder(path, target)
        return target
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"model.name: {path} has no config.json (not a Hugging Face model folder)"
            )
        return path
    if HUB_ID.fullmatch(name):
        return hub_model_folder(name)
    raise FileNotFoundError(
        f"model.name: {name!r} is neither a built-in or registered model ({', '.join(MODELS.names())}), a model folder, "
        "a .gguf file, nor a hub id (organisation/name) in the local Hugging Face cache"
    )


def quantization_settings(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, object]:
    """``from_pretrained`` keyword arguments for ``model.quantization`` (empty without it): 4 bits as
    ``model.quant_type`` / ``double_quant`` / ``quant_compute_dtype`` say (default QLoRA's recipe: NF4 weights,
    double quantisation of the scales, matmuls at the model's ``dtype``), or LLM.int8()."""
    if cfg.quantization is None:
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"model.quantization: {cfg.quantization} needs the bitsandbytes package: pip install 'fedlora[qlora]' "
            "(or set model.quantization: null)"
        ) from None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == 4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, cfg.quant_compute_dtype)
            if cfg.quant_compute_dtype
            else dtype,
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": quantization}


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: classification heads: trained (in the adapter state), so they stay float32
HEAD_NAMES = ("score", "classifier")


def cast_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Keep every frozen linear weight of ``model`` in ``dtype`` (``compute.base_dtype``), once, so that an
    autocast forward in ``dtype`` does not cast it again at every step. The output layer (the LM head, often
    tied to the input embedding) stays float32: fedlora computes the logits outside autocast, at full
    precision (:mod:`fedlora.client.loss`). Returns the number of weights cast."""
    output_of = getattr(model, "get_output_embeddings", None)  # transformers' models have it
    output = output_of() if output_of is not None else None
    count = 0
    for name, module in model.named_modules():
        if (
            not isinstance(module, torch.nn.Linear)
            or module is output
            or name.rsplit(".", 1)[-1] in HEAD_NAMES
        ):
            continue
        weight = module.weight
        if weight.requires_grad or weight.dtype == dtype:
            continue
        module.weight = torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        if module.bias is not None:
            module.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        count += 1
    return count


def load_base_model(
    cfg: ModelConfig,
    num_labels: int | None = None,
    head_seed: int = 0,
    compute: ComputeConfig | None = None,
) -> ModelBundle:
    """Load the frozen base model for ``cfg.task``; a new classification head is initialised from ``head_seed``
    (on the CPU, so it is the same whatever the device). With ``compute``: moved to its device, with gradient
    checkpointing if asked for."""
    folder = resolve_model_folder(cfg)
    dtype = getattr(torch, cfg.dtype)
    quantized = quantization_settings(cfg, dtype)
    device = resolve_device(compute.device if compute is not None else "cpu")
    if quantized:  # bitsandbytes places the weights as it quantizes them; they cannot be moved afterwards
        quantized["device_map"] = {"": device}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.task == "classification":
        if not num_labels:
            raise ValueError("a classification model needs the number of labels from the data")
        with torch.random.fork_rng():
            torch.manual_seed(head_seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=num_labels, dtype=dtype, **quantized
            )
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **quantized)
    for param in model.parameters():
        param.requires_grad_(False)
    if compute is not None:
        if not quantized:
            model.to(device)
        if compute.base_dtype != "fp32":
            cast_frozen_linears(model, _DTYPES[compute.base_dtype])
        if compute.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        task=cfg.task,
        folder=folder,
        num_labels=num_labels,
        source=model_source_id(cfg.name),
    )


def model_source_id(name: str) -> str:
    """The hub id ``model.name`` stands for (``""`` when it is a local folder, a GGUF file or a model built here)."""
    if name in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[name]
    return name if HUB_ID.fullmatch(name) and not Path(name).expanduser().exists() else ""
