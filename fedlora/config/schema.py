"""The experiment config: one validated tree of settings, one YAML file per experiment.

Every section forbids unknown keys, so a typo fails before any work with the field's dotted path,
the value given and what is allowed (see :func:`fedlora.config.loader.format_validation_error`).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated, and no number may
    be infinite or NaN (an inf learning rate or rank scale would only fail later, or silently)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, populate_by_name=True
    )


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

    name: str = "smollm2-135m-instruct"
    task: Literal["causal-lm", "classification"] = "causal-lm"
    dtype: Literal["float32", "bfloat16"] = "float32"
    cache_dir: str | None = None
    # Size of the random model when name == "tiny-llama" (ignored otherwise).
    tiny_hidden_size: int = Field(64, ge=8)
    tiny_num_layers: int = Field(2, ge=1)
    # Model-heterogeneous federations: each client runs one of these (seeded by federation.seed). Empty:
    # every client runs ``name`` (one shared base model).
    variants: list[ModelVariant] = Field(default_factory=list)
    #: where the shared adapter of model-heterogeneous clients sits: ``last-layer``, LoRA on the attention
    #: projections of each model's last layer (one hidden size on every client); ``representation``
    #: (classification), a rank-r residual adapter in a ``shared_dim``-wide space between each client's own
    #: projection of its pooled representation and its own classifier (any widths, any architectures)
    shared_adapter: Literal["last-layer", "representation"] = "last-layer"
    shared_dim: int = Field(64, ge=1)
    #: QLoRA-style: load the frozen base model's linear layers in 4-bit NF4 (double-quantised) or 8-bit
    #: (bitsandbytes, ``pip install 'fedlora[qlora]'``); LoRA factors and what travels stay float32
    quantization: Literal[4, 8] | None = None


class DataConfig(Section):
    """Where the examples come from and how they are shaped into prompts and targets."""

    #: a registered data source: reasoning-gym, natural-instructions, json, hf, bbc-news, or your own
    source: str = "reasoning-gym"
    #: json: a .json/.jsonl file; hf: a save_to_disk folder, a .parquet/.csv/.json(l)/.arrow file or a hub
    #: dataset id in the local Hugging Face cache; natural-instructions: file or folder
    path: str | None = None
    # reasoning-gym: one client per task (natural partition) unless partition.method says otherwise.
    tasks: list[str] = Field(default_factory=lambda: ["basic_arithmetic", "chain_sum", "gcd", "lcm"])
    examples_per_task: int = Field(64, ge=1)
    # natural-instructions: which file and how many of its clients (first N in file order; None = all).
    variant: Literal["mini", "full"] = "mini"
    max_clients: int | None = Field(None, ge=1)
    # json: field names of the instruction/input/output form, and the category used for natural splits.
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    category_field: str | None = "category"
    # hf: which split of a dataset with several (a DatasetDict folder, a hub dataset), and a chat column
    # (a list of {role, content} messages) to read instead of instruction/input/output
    hf_split: str = "train"
    messages_field: str | None = None
    # Per-client split of pooled data (json, reasoning-gym, bbc-news); natural-instructions ships its own.
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_train_examples_per_client: int | None = Field(None, ge=1)
    max_eval_examples_per_client: int | None = Field(None, ge=1)
    template: Literal["auto", "chat", "alpaca"] = "auto"
    train_on_inputs: bool = False
    max_seq_len: int = Field(256, ge=8)
    #: causal LM: pack each training batch's examples into rows of max_seq_len tokens (block-diagonal
    #: attention, positions restarting per example: no cross-example attention, the same loss, less padding)
    packing: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataConfig:
        if self.eval_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"eval_fraction + test_fraction must be < 1 (got {self.eval_fraction} + {self.test_fraction})"
            )
        return self


class PartitionConfig(Section):
    """How pooled examples are split into clients.

    ``natural``: one client per category (task) value; ``iid``: uniform random shards;
    ``dirichlet``: per-client label/category proportions drawn from Dir(alpha) (small alpha = skewed).
    """

    #: a registered partitioner: natural, iid, dirichlet, or your own
    method: str = "natural"
    alpha: float = Field(0.5, gt=0.0)
    by: Literal["category", "label"] = "category"
    min_partition_size: int = Field(2, ge=0)


class FederationConfig(Section):
    """Who takes part: ``num_clients`` (None = as many as the data yields), sampling per round, rounds.

    Robustness: a round with fewer than ``min_replies`` valid replies is skipped (the global adapter stays)
    or retried with a fresh sample up to ``max_retries`` times (``on_too_few``); ``max_skipped_rounds`` in a
    row end the run with an error. A reply whose update (reply - what the client was sent, all tensors as one
    vector) has a norm above ``max_update_norm``, or above ``max_update_norm_ratio`` times a reference, is
    rejected: the median of the last ``update_norm_history`` accepted update norms, the norm of what the
    client was sent, and (with 3 or more replies, or when there is no other reference) the round's median.
    With ``clip_update_norm`` the accepted updates are scaled down to that norm before aggregation
    (norm-bounded averaging). A reply claiming more examples than the client holds is rejected.
    ``aggregation``: ``mean`` (the method's own rule), or a robust rule for methods that average
    (``median``: coordinate-wise median; ``trimmed-mean``: drop ``trim_fraction`` of the values at each end).
    """

    num_clients: int | None = Field(None, ge=1)
    clients_per_round: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0.0, le=1.0)
    rounds: int = Field(3, ge=1, le=1_000_000)
    seed: int = 0
    min_replies: int = Field(1, ge=1)
    on_too_few: Literal["skip", "retry"] = "skip"
    max_retries: int = Field(2, ge=0)
    max_update_norm: float | None = Field(None, gt=0.0)
    max_update_norm_ratio: float | None = Field(100.0, gt=1.0)
    update_norm_history: int = Field(50, ge=1)
    clip_update_norm: float | None = Field(None, gt=0.0)
    max_skipped_rounds: int | None = Field(3, ge=1)
    aggregation: Literal["mean", "median", "trimmed-mean"] = "mean"
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5)

    @model_validator(mode="after")
    def _one_sampling_rule(self) -> FederationConfig:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("give clients_per_round or fraction, not both")
        if (
            self.num_clients is not None
            and self.clients_per_round is not None
            and self.clients_per_round > self.num_clients
        ):
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) is above num_clients ({self.num_clients})"
            )
        return self


class FaultsConfig(Section):
    """Failure injection (embedded engine): fractions of the sampled clients that drop out (no reply),
    straggle past the round deadline (reply discarded) or return a corrupted update of one of ``kinds``."""

    dropout: float = Field(0.0, ge=0.0, le=1.0)
    straggler: float = Field(0.0, ge=0.0, le=1.0)
    corrupt: float = Field(0.0, ge=0.0, le=1.0)
    kinds: list[Literal["nan", "inf", "shape", "rank", "norm"]] = Field(
        default_factory=lambda: ["nan", "inf", "shape", "rank", "norm"], min_length=1
    )
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self) -> FaultsConfig:
        if self.dropout + self.straggler + self.corrupt > 1.0:
            raise ValueError("dropout + straggler + corrupt must be <= 1")
        return self


class ClientConfig(Section):
    """Local training of one client in one round.

    ``optimizer: null`` takes the strategy's own choice (fedit: AdamW, fedavg/fedprox: SGD).
    Exactly one of ``local_steps`` / ``local_epochs`` decides the length of local training.
    """

    optimizer: Literal["adamw", "sgd"] | None = None
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    local_steps: int | None = Field(10, ge=1)
    local_epochs: float | None = Field(None, gt=0.0)
    batch_size: int = Field(4, ge=1)
    #: global-norm gradient clipping of each optimizer step (``max_grad_norm`` is accepted as its other name)
    grad_clip: float | None = Field(1.0, gt=0.0, validation_alias=AliasChoices("grad_clip", "max_grad_norm"))
    #: the learning-rate schedule over a client's optimizer steps in a round (``transformers.get_scheduler``)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    #: round-level decay: round t trains at lr * lr_decay^(t - 1) (FedIT / FlowerTune's schedule across rounds)
    lr_decay: float = Field(1.0, gt=0.0, le=1.0)
    #: micro-batches of ``batch_size`` per optimizer step (``local_steps`` counts optimizer steps)
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    num_threads: int = Field(1, ge=1, le=256)

    @model_validator(mode="after")
    def _one_length(self) -> ClientConfig:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("give exactly one of local_steps and local_epochs (set the other to null)")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        return self


class ComputeConfig(Section):
    """Where and how the arithmetic runs (results do not depend on ``workers``; see docs/compute.md).

    ``device``: ``auto`` (the first CUDA GPU, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``: the
    base model, batches, evaluation and generation live there. ``server_device``: where the server's
    aggregation arithmetic runs (FlexLoRA's SVD...; ``auto`` = ``device``). ``precision``: autocast of the
    base model's forward and backward (``bf16``/``fp16``; ``fp16`` with a gradient scaler); LoRA factors,
    optimizer state, aggregation and everything that travels stay float32. ``gradient_checkpointing``:
    recompute activations in the backward pass (memory for time, for large models).
    ``workers``: clients of a round trained in parallel worker processes, each with its own model copy
    (``auto``: one per core the machine's memory allows when the model is large enough to pay for the
    processes, else 1; 1 = in this process). ``devices``: one worker per listed device (GPUs).
    ``batch_clients``: all sampled clients' local steps in one forward/backward over the shared base model
    (first-order strategies whose hooks allow it; others fall back to one client at a time with a note).
    """

    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    server_device: str = Field("cpu", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    workers: int | Literal["auto"] = "auto"
    devices: list[str] = Field(default_factory=list)
    batch_clients: bool = False

    @field_validator("workers")
    @classmethod
    def _positive_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError("workers must be 'auto' or between 1 and 256")
        return value

    @field_validator("devices")
    @classmethod
    def _device_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
                raise ValueError(f"devices: {name!r} is not cpu, mps, cuda or cuda:N")
        return value


class AdapterConfig(Section):
    """LoRA: W = W0 + s_r B A on each target module, s_r = alpha / r (PEFT's convention).

    ``use_rslora``: rank-stabilised LoRA, s_r = alpha / sqrt(r) (PEFT's ``use_rslora``), so that clients at
    high ranks are not scaled down by 1 / r; the exported adapter carries the flag.
    """

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    use_rslora: bool = False
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    init_seed: int = 0

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

    distribution: Literal[
        "homogeneous", "uniform", "heavy-tail-light", "heavy-tail-strong", "normal", "custom"
    ] = "homogeneous"
    rank_types: list[RankType] = Field(default_factory=_paper_rank_types, min_length=1)
    shares: list[float] | None = None
    rank_scale: float = Field(1.0, gt=0.0)
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


class PrivacyConfig(Section):
    """Differential privacy on each client: DP-SGD through Opacus on the trainable adapter parameters.

    Each local step clips every example's gradient to ``max_grad_norm`` (C) and adds Gaussian noise of
    standard deviation ``noise_multiplier * C`` to their sum. Give the noise multiplier directly, or a
    ``target_epsilon``: then each client gets the smallest noise multiplier for which (epsilon, ``delta``)
    holds after ALL the steps it could take (every round, its local steps per round, sampling rate
    batch_size / n_i), so the budget holds whichever rounds it is sampled in. ``sampling: poisson`` (what
    the accountant assumes) or ``shuffle`` (fixed-size batches; the accountant's figure is then the usual
    approximation). The spent epsilon of each client is tracked by the accountant across rounds.
    """

    enabled: bool = False
    target_epsilon: float | None = Field(None, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    noise_multiplier: float | None = Field(None, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    sampling: Literal["poisson", "shuffle"] = "poisson"
    accountant: Literal["rdp", "prv"] = "rdp"
    max_noise_multiplier: float = Field(50.0, gt=0.0)

    @model_validator(mode="after")
    def _one_noise_rule(self) -> PrivacyConfig:
        if self.enabled and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("with enabled: true give exactly one of target_epsilon and noise_multiplier")
        return self


class StrategyConfig(Section):
    """The federated method: ``name`` is a registered strategy; ``options`` are its own settings."""

    name: str = "fedit"
    options: dict[str, float | int | str | bool | None] = Field(default_factory=dict)


class EvalConfig(Section):
    """Evaluation of the global adapter after a round (``every`` rounds and after the last).

    Protocols: with ``held_out_clients: N > 0``, N seeded clients never train and the global model is
    evaluated on them (zero-shot generalisation, FlexLoRA's protocol); otherwise on the training clients'
    own ``split``. ``max_clients``: a fixed seeded sample of the evaluation clients (None = all) so
    evaluation does not dominate run time. ``metrics`` run at every evaluation; ``final_metrics`` only after
    the last round (e.g. the slower generation metrics). Evaluators: ``loss``, ``rouge-l``, ``exact-match``.
    """

    every: int = Field(1, ge=1)
    split: Literal["eval", "test"] = "eval"
    max_clients: int | None = Field(None, ge=1)
    final_max_clients: int | None = Field(None, ge=1)
    held_out_clients: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    metrics: list[str] = Field(default_factory=lambda: ["loss"])
    final_metrics: list[str] = Field(default_factory=list)
    max_new_tokens: int = Field(64, ge=1)
    #: stop when ``early_stopping_metric`` has not improved for this many evaluated rounds (None: never);
    #: the best round's adapter is kept in RUN/best/
    early_stopping_patience: int | None = Field(None, ge=1)
    #: a per-round figure (``eval_loss``, ``eval_accuracy``, ``eval_rouge_l``...): losses and perplexities are
    #: better lower, everything else higher
    early_stopping_metric: str = "eval_loss"


class OutputConfig(Section):
    """Where the run directory goes and how many round checkpoints to keep (the newest ones)."""

    dir: str | None = None
    root: str = "runs"
    keep_checkpoints: int = Field(2, ge=1)
    plot: bool = True
    #: experiment trackers beside metrics.jsonl: tensorboard, wandb (offline unless WANDB_MODE), mlflow (a
    #: file store in the run folder unless MLFLOW_TRACKING_URI), or one registered by a plugin
    trackers: list[str] = Field(default_factory=list)
    #: the W&B project / MLflow experiment the run goes into
    tracking_project: str = "fedlora"
    tensorboard: bool = False  # the same as listing tensorboard in trackers
    #: also export the global adapter every N rounds, as RUN/adapters/round_N/ (plain PEFT folders)
    save_every: int | None = Field(None, ge=1)


class ExperimentConfig(Section):
    """One experiment: every section above, plus a name and the engine that runs it."""

    #: the run's name (also its folder's name under output.root): letters, digits, '.', '_', '-'
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
    engine: Literal["embedded", "flower-sim"] = "embedded"
    #: importable modules with user strategies, data sources, metrics...; imported by every process that
    #: reads this config (run, --resume, eval, Flower nodes) before any name is looked up
    plugins: list[str] = Field(default_factory=list)
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
        if self.privacy.enabled and self.client.gradient_accumulation_steps > 1:
            raise ValueError(
                "client.gradient_accumulation_steps must be 1 with privacy.enabled (a DP-SGD step takes one "
                "sampled batch: raise client.batch_size instead)"
            )
        return self

    @model_validator(mode="after")
    def _packing_fits(self) -> ExperimentConfig:
        if self.data.packing and self.model.task != "causal-lm":
            raise ValueError("data.packing is for model.task causal-lm (a classification row is one example)")
        if self.data.packing and self.privacy.enabled:
            raise ValueError(
                "data.packing cannot be used with privacy.enabled: DP-SGD clips per example, and a packed row "
                "holds several examples; set data.packing: false"
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

    @model_validator(mode="after")
    def _task_matches_data(self) -> ExperimentConfig:
        if self.data.source == "bbc-news" and self.model.task != "classification":
            raise ValueError(
                "data.source 'bbc-news' is a classification set: set model.task to 'classification'"
            )
        if self.model.task == "classification" and self.data.source in (
            "reasoning-gym",
            "natural-instructions",
        ):
            raise ValueError(
                f"model.task 'classification' needs labelled data (bbc-news, json or a labelled source of your "
                f"own), not {self.data.source!r}"
            )
        return self
