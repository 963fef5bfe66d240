"""What is trained: the base model (and per-client architectures), the LoRA adapter, the clients' ranks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fedlora.config.sections.base import Section


class ModelVariant(Section):
    """One client model architecture of a model-heterogeneous federation (pFedLoRA).

    ``name``: a model like ``model.name`` (None = ``model.name``), with its own tokenizer; ``num_layers``: keep
    only its first N transformer layers (None = all); ``share``: the fraction of clients that run it
    (normalised); ``tiny_hidden_size``: the width of a ``tiny-llama`` variant (None = ``model.tiny_hidden_size``).
    """

    name: str | None = None
    num_layers: int | None = Field(None, ge=1)
    share: float = Field(1.0, gt=0.0)
    tiny_hidden_size: int | None = Field(None, ge=8)


class ModelConfig(Section):
    """Which base model to load.

    ``name`` is a built-in entry (``tiny-llama``, ``smollm2-135m-instruct``, ``all-minilm-l6-v2``),
    a local Hugging Face folder with safetensors, or a ``.gguf`` file (converted once into a
    safetensors cache folder).
    """

    #: a built-in (tiny-llama, smollm2-135m-instruct, all-minilm-l6-v2), a local Hugging Face folder, a .gguf
    #: file or a hub id in the local cache
    name: str = "smollm2-135m-instruct"
    #: causal-lm (instruction tuning) or classification (a sequence-classification head)
    task: Literal["causal-lm", "classification"] = "causal-lm"
    #: the base model's weights: float32 or bfloat16
    dtype: Literal["float32", "bfloat16"] = "float32"
    #: where built-in models are fetched and converted (None: $FEDLORA_CACHE or ~/.cache/fedlora)
    cache_dir: str | None = None
    # Size of the random model when name == "tiny-llama" (ignored otherwise).
    tiny_hidden_size: int = Field(64, ge=8)
    #: layers of the random model when name == "tiny-llama"
    tiny_num_layers: int = Field(2, ge=1)
    # Model-heterogeneous federations: each client runs one of these (seeded by federation.seed). Empty:
    # every client runs ``name`` (one shared base model).
    variants: list[ModelVariant] = Field(default_factory=list)
    #: where the shared adapter of model-heterogeneous clients sits: ``last-layer``, LoRA on the attention
    #: projections of each model's last layer (one hidden size on every client); ``representation``
    #: (classification), a rank-r residual adapter in a ``shared_dim``-wide space between each client's own
    #: projection of its pooled representation and its own classifier (any widths, any architectures)
    shared_adapter: Literal["last-layer", "representation"] = "last-layer"
    #: shared_adapter representation: the width of the shared space
    shared_dim: int = Field(64, ge=1)
    #: QLoRA-style: load the frozen base model's linear layers in 4-bit (quant_type) or 8-bit
    #: (bitsandbytes, ``pip install 'fedlora[qlora]'``); LoRA factors and what travels stay float32
    quantization: Literal[4, 8] | None = None
    #: quantization 4: the 4-bit data type, nf4 (QLoRA's NormalFloat) or fp4 (bitsandbytes' default, what
    #: FlowerTune's ``BitsAndBytesConfig(load_in_4bit=True)`` gets); bnb_4bit_quant_type
    quant_type: Literal["nf4", "fp4"] = "nf4"
    #: quantization 4: quantize the quantization constants too (QLoRA's double quantization, ~0.4 bit per
    #: weight less); bnb_4bit_use_double_quant
    double_quant: bool = True
    #: quantization 4: the dtype the dequantized matmuls run in (None: model.dtype); bnb_4bit_compute_dtype
    quant_compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None

    @model_validator(mode="after")
    def _four_bit_settings_need_four_bits(self) -> ModelConfig:
        # off their defaults (a saved config.yaml holds every field, so being set says nothing)
        given = [
            name
            for name, default in (
                ("quant_type", "nf4"),
                ("double_quant", True),
                ("quant_compute_dtype", None),
            )
            if getattr(self, name) != default
        ]
        if given and self.quantization != 4:
            raise ValueError(
                f"model.{sorted(given)[0]} sets up 4-bit weights; set model.quantization: 4 (it is "
                f"{self.quantization}) or remove it"
            )
        return self


class AdapterConfig(Section):
    """LoRA: W = W0 + s_r B A on each target module, s_r = alpha / r (PEFT's convention).

    ``use_rslora``: rank-stabilised LoRA, s_r = alpha / sqrt(r) (PEFT's ``use_rslora``), so that clients at
    high ranks are not scaled down by 1 / r; the exported adapter carries the flag.
    ``scale``: one constant s at every rank, alpha = s r on each module (what FLoRA's reference code does for
    clients of different ranks, ``lora_alpha = 2 r_i``, and Fed-SB's, ``lora_alpha = r``); the exported adapter
    carries the per-module alphas.
    ``use_dora``: DoRA (Liu et al., 2024; PEFT's ``use_dora``): W = m (W0 + s_r B A) / ||W0 + s_r B A||_c,
    a trainable magnitude m per output feature (``lora_magnitude_vector``) beside A and B; it travels and
    is averaged like them, and the exported adapter loads with plain PEFT as DoRA. Methods whose rule
    reads A/B pairs only (SVD, stacking, freezing) refuse it.
    """

    #: r, the LoRA rank (every client, unless resources says otherwise)
    rank: int = Field(8, ge=1)
    #: LoRA alpha: the scale is alpha / r (alpha / sqrt(r) with use_rslora)
    alpha: float = Field(16.0, gt=0.0)
    #: rank-stabilised LoRA: scale alpha / sqrt(r)
    use_rslora: bool = False
    #: DoRA: a trainable magnitude vector per target module beside A and B (PEFT's use_dora)
    use_dora: bool = False
    #: a constant LoRA scale s at every rank (alpha = s r per module) instead of alpha / r; None: alpha / r
    scale: float | None = Field(None, gt=0.0)
    #: LoRA dropout on the adapter input
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    #: module names LoRA is put on (a wrong name lists the model's linear modules), or all-linear
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    #: seeds the initial A factors (the same on every client)
    init_seed: int = 0

    @model_validator(mode="after")
    def _one_scaling_rule(self) -> AdapterConfig:
        if self.scale is not None and self.use_rslora:
            raise ValueError(
                "adapter.scale (a constant s at every rank) and adapter.use_rslora exclude each other"
            )
        return self

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("target_modules must name at least one module")
        return value


class RankType(Section):
    """One client type: its LoRA rank on attention modules and on MLP modules."""

    attention: int = Field(ge=1)
    mlp: int = Field(ge=1)

    @model_validator(mode="before")
    @classmethod
    def _one_number_means_both(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            return {"attention": value, "mlp": value}
        return value


def _paper_rank_types() -> list[RankType]:
    return [RankType(attention=a, mlp=m) for a, m in ((8, 8), (30, 30), (30, 200), (200, 200))]


class ResourcesConfig(Section):
    """Client resource profiles: the LoRA rank each client trains at (FlexLoRA's heterogeneity).

    ``distribution``: ``homogeneous`` (every client at ``adapter.rank``), one of the FlexLoRA paper's
    named client shares over ``rank_types`` (``uniform`` 25/25/25/25, ``heavy-tail-light`` 80/5/5/10,
    ``heavy-tail-strong`` 5/5/10/80, ``normal`` 5.75/5.75/44.25/44.25 as in FlexLoRA's released code), or ``custom`` with ``shares``.
    ``rank_types`` default to the paper's four (r=8, r=30, 30 attention / 200 MLP, r=200), each rank
    multiplied by ``rank_scale`` (rounded, at least 1) to fit smaller models. ``force: min | max`` puts
    every client at the smallest / largest type in use (the homogeneous baselines of the bucket effect).
    The assignment is seeded by ``federation.seed`` and saved in the run's clients.json.
    """

    #: how clients are spread over rank_types: homogeneous, uniform, heavy-tail-light, heavy-tail-strong,
    #: normal, custom
    distribution: Literal[
        "homogeneous", "uniform", "heavy-tail-light", "heavy-tail-strong", "normal", "custom"
    ] = "homogeneous"
    #: the client types, each a rank on attention and on MLP modules
    rank_types: list[RankType] = Field(default_factory=_paper_rank_types, min_length=1)
    #: distribution custom: one share per rank type
    shares: list[float] | None = None
    #: multiplies every rank type (rounded, at least 1) to fit smaller models
    rank_scale: float = Field(1.0, gt=0.0)
    #: min / max: every client at the smallest / largest type in use
    force: Literal["min", "max"] | None = None

    @model_validator(mode="after")
    def _shares_fit_types(self) -> ResourcesConfig:
        if self.distribution == "custom":
            if self.shares is None:
                raise ValueError("distribution 'custom' needs shares (one per rank type)")
        elif self.shares is not None:
            raise ValueError(
                f"shares are only for distribution 'custom' (got distribution {self.distribution!r})"
            )
        elif self.distribution not in ("homogeneous", "custom") and len(self.rank_types) != 4:
            raise ValueError(
                f"distribution {self.distribution!r} gives shares for the paper's 4 rank types; "
                f"got {len(self.rank_types)} rank_types (use distribution 'custom' with shares)"
            )
        if self.shares is not None:
            if len(self.shares) != len(self.rank_types):
                raise ValueError(f"{len(self.shares)} shares for {len(self.rank_types)} rank_types")
            if any(s < 0 for s in self.shares) or sum(self.shares) <= 0:
                raise ValueError(f"shares must be >= 0 with a positive sum, got {self.shares}")
        return self
