"""The experiment config: one validated tree of settings, one YAML file per experiment.

Every section forbids unknown keys, so a typo fails before any work with the field's dotted path,
the value given and what is allowed (see :func:`fedlora.config.loader.format_validation_error`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedlora.config.sections.base import MODULE_NAME, Section
from fedlora.config.sections.data import DataConfig, PartitionConfig
from fedlora.config.sections.model import (
    AdapterConfig,
    ModelConfig,
    ModelVariant,
    RankType,
    ResourcesConfig,
)
from fedlora.config.sections.outputs import EvalConfig, OutputConfig
from fedlora.config.sections.training import (
    ClientConfig,
    ComputeConfig,
    FaultsConfig,
    FederationConfig,
    PrivacyConfig,
    StrategyConfig,
)


class ExperimentConfig(Section):
    """One experiment: every section above, plus a name and the engine that runs it."""

    #: the run's name (also its folder's name under output.root): letters, digits, '.', '_', '-'
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
    #: embedded (in this process, or worker processes) or flower-sim (Flower simulation)
    engine: Literal["embedded", "flower-sim"] = "embedded"
    #: importable modules with user strategies, data sources, metrics...; imported by every process that
    #: reads this config (run, --resume, eval, Flower nodes) before any name is looked up. Plugins are trusted
    #: code: each process that reads the config runs them (list only modules you would import yourself)
    plugins: list[Annotated[str, Field(pattern=MODULE_NAME)]] = Field(default_factory=list)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _dp_takes_whole_batches(self) -> ExperimentConfig:
        if self.privacy.dp_sgd and self.client.gradient_accumulation_steps > 1:
            raise ValueError(
                "client.gradient_accumulation_steps must be 1 with privacy.enabled (a DP-SGD step takes one "
                "sampled batch: raise client.batch_size instead)"
            )
        return self

    @model_validator(mode="after")
    def _client_privacy_needs_an_average(self) -> ExperimentConfig:
        if self.privacy.client_level and self.federation.aggregation != "mean":
            raise ValueError(
                f"privacy.unit client noises the average of the clipped updates; federation.aggregation "
                f"{self.federation.aggregation} replaces that average (its sensitivity is not C / m): set "
                "federation.aggregation: mean"
            )
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> ExperimentConfig:
        if (
            self.federation.secure_aggregation
            and self.privacy.client_level
            and self.privacy.adaptive_clipping
        ):
            raise ValueError(
                "privacy.adaptive_clipping moves C by the share of updates it clipped, which the server counts "
                "from each update; with federation.secure_aggregation the clients clip with a fixed C: set "
                "privacy.adaptive_clipping: false"
            )
        if self.federation.secure_aggregation and self.model.variants:
            raise ValueError(
                "federation.secure_aggregation runs on Flower, and model-heterogeneous clients (model.variants) "
                "run on the embedded engine only: remove model.variants or turn secure_aggregation off"
            )
        if self.federation.secure_aggregation and self.faults.corrupt > 0:
            raise ValueError(
                "faults.corrupt corrupts single replies at the server, which secure aggregation never holds: "
                "set faults.corrupt: 0"
            )
        return self

    @model_validator(mode="after")
    def _base_dtype_fits(self) -> ExperimentConfig:
        if self.compute.base_dtype != "fp32" and self.model.quantization is not None:
            raise ValueError(
                "compute.base_dtype applies to a full-precision base; a quantized base (model.quantization) "
                "already computes in its own dtype: set compute.base_dtype: fp32"
            )
        return self

    @model_validator(mode="after")
    def _packing_fits(self) -> ExperimentConfig:
        if self.data.packing and self.model.task != "causal-lm":
            raise ValueError("data.packing is for model.task causal-lm (a classification row is one example)")
        if self.data.packing and self.privacy.dp_sgd:
            raise ValueError(
                "data.packing cannot be used with privacy.enabled: DP-SGD clips per example, and a packed row "
                "holds several examples; set data.packing: false"
            )
        return self

    @model_validator(mode="after")
    def _benchmarks_need_a_language_model(self) -> ExperimentConfig:
        if self.eval.tasks and self.model.task != "causal-lm":
            raise ValueError(
                "eval.tasks score a language model's choices (model.task causal-lm); a classifier has its own "
                "accuracy in eval.metrics: loss. Remove eval.tasks"
            )
        return self

    @model_validator(mode="after")
    def _representation_adapter_fits(self) -> ExperimentConfig:
        if self.model.shared_adapter == "representation" and self.model.task != "classification":
            raise ValueError(
                "model.shared_adapter 'representation' sits before a classifier: set model.task to "
                "'classification', or use shared_adapter 'last-layer'"
            )
        return self

    @model_validator(mode="after")
    def _quantized_base_stays_frozen(self) -> ExperimentConfig:
        if self.model.quantization is not None and self.model.variants:
            raise ValueError(
                "model.quantization cannot be combined with model.variants (each client's own model trains its "
                "base weights, which a quantized model cannot): remove one of them"
            )
        if self.model.quantization is not None and self.compute.device == "mps":
            raise ValueError(
                "model.quantization needs a CUDA GPU or the CPU (bitsandbytes has no MPS kernels)"
            )
        return self


__all__ = [
    "AdapterConfig",
    "ClientConfig",
    "ComputeConfig",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FaultsConfig",
    "FederationConfig",
    "ModelConfig",
    "ModelVariant",
    "OutputConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "RankType",
    "ResourcesConfig",
    "Section",
    "StrategyConfig",
]
