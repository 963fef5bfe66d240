"""How the federation trains: who takes part each round, injected faults, local training, compute, privacy,
the strategy."""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import AliasChoices, Field, ValidationInfo, field_validator, model_validator

from fedlora.config.sections.base import Section


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

    #: how many clients (None: as many as the data yields; auto/iid/dirichlet split into this many)
    num_clients: int | None = Field(None, ge=1)
    #: clients sampled each round (None with fraction None: all of them)
    clients_per_round: int | None = Field(None, ge=1)
    #: share of the clients sampled each round (FlowerTune's fraction-fit); or clients_per_round
    fraction: float | None = Field(None, gt=0.0, le=1.0)
    #: communication rounds (FlowerTune's num-server-rounds)
    rounds: int = Field(3, ge=1, le=1_000_000)
    #: seeds client sampling, resource assignment and the held-out clients
    seed: int = 0
    #: a round with fewer valid replies than this is skipped or retried (on_too_few)
    min_replies: int = Field(1, ge=1)
    #: skip the round (the global adapter stays) or retry it with a fresh sample
    on_too_few: Literal["skip", "retry"] = "skip"
    #: retries of a round with too few replies (on_too_few: retry)
    max_retries: int = Field(2, ge=0)
    #: reject a reply whose update norm is above this (None: no absolute limit)
    max_update_norm: float | None = Field(None, gt=0.0)
    #: reject a reply whose update norm is above this many times the reference norm
    max_update_norm_ratio: float | None = Field(100.0, gt=1.0)
    #: accepted update norms the reference median is taken over
    update_norm_history: int = Field(50, ge=1)
    #: scale accepted updates down to this norm before aggregation (None: off)
    clip_update_norm: float | None = Field(None, gt=0.0)
    #: end the run with an error after this many skipped rounds in a row (None: never)
    max_skipped_rounds: int | None = Field(3, ge=1)
    #: seconds a client may take in a round before the round goes on without it (reason "timeout" in
    #: metrics.jsonl; a worker process is replaced); auto: 10 x the median client time so far, never below
    #: client_timeout_floor (which is the limit until a first client has finished)
    client_timeout: float | Literal["auto"] = "auto"
    #: the shortest auto client_timeout, in seconds
    client_timeout_floor: float = Field(600.0, gt=0.0)
    aggregation: Literal["mean", "median", "trimmed-mean"] = "mean"
    #: aggregation trimmed-mean: the share of the round's replies dropped at each end of every coordinate
    #: (floor(trim_fraction x replies), at least one per side with 3 or more replies)
    trim_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    #: the dtype payloads travel in, both ways (fedlora.adapters.wire): fp32; bf16 / fp16 (half the bytes);
    #: int8 with one float32 scale per row (a quarter); matrices only, vectors stay float32; uploads carry
    #: the update against what the client was sent; bytes_up and bytes_down count what is sent
    wire_dtype: Literal["fp32", "bf16", "fp16", "int8"] = "fp32"
    #: wire_dtype other than fp32: each client adds the rounding error of its last upload to the next one
    #: (error feedback; the residual stays on the client)
    wire_error_feedback: bool = False
    #: Flower engines only (flower-sim, fedlora deploy): Flower's SecAgg+ sums the clients' masked, quantised
    #: replies, so the server never holds one client's update (fedlora.engine.flower.secure); for methods whose
    #: aggregate is an example-weighted average, others are refused with the reason
    secure_aggregation: bool = False
    #: SecAgg+'s num_shares: how many clients each one's secrets are shared with (a fraction of the round's
    #: clients, or a count above 2); more shares survive more dropouts and cost more
    secagg_num_shares: float | int = Field(1.0, gt=0)
    #: SecAgg+'s reconstruction_threshold: shares needed to rebuild a secret (a fraction of the shares, or a
    #: count); a higher one takes more colluding clients to unmask one, and tolerates fewer dropouts
    secagg_reconstruction_threshold: float | int = Field(0.5, gt=0)
    #: SecAgg+'s clipping_range: each value sent is clipped to [-c, c] before it is quantised
    secagg_clipping_range: float = Field(8.0, gt=0.0)
    #: SecAgg+'s quantization_range: the levels over [-c, c] (step 2c / this); at most 2**32 / clients a round
    secagg_quantization_range: int = Field(2**22, ge=2, lt=2**32)

    @model_validator(mode="after")
    def _one_sampling_rule(self) -> FederationConfig:
        if self.secure_aggregation:
            self._check_secure_aggregation()
        if self.wire_error_feedback and self.wire_dtype == "fp32":
            raise ValueError(
                "wire_error_feedback corrects the rounding of a coded wire: set wire_dtype to bf16, fp16 or int8"
            )
        if isinstance(self.client_timeout, float) and self.client_timeout <= 0:
            raise ValueError(f"client_timeout {self.client_timeout:g} must be above 0 seconds (or auto)")
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
        sampled = self.sampled_per_round()
        if self.aggregation == "trimmed-mean" and sampled is not None:
            if sampled < 3:
                raise ValueError(
                    f"aggregation trimmed-mean of {sampled} replies per round cannot drop a value at each end "
                    "and keep one; sample 3 or more clients, or use aggregation: median"
                )
            if int(self.trim_fraction * sampled) < 1:
                raise ValueError(
                    f"trim_fraction {self.trim_fraction} of {sampled} replies per round trims nothing (it would "
                    f"be the plain mean); trim_fraction {math.ceil(1e6 / sampled) / 1e6:g} or more drops one at "
                    "each end"
                )
        return self

    def sampled_per_round(self) -> int | None:
        """Clients a round samples, when the section alone tells (clients_per_round, or fraction of a given
        num_clients), else None (it depends on the data)."""
        return self.clients_per_round or (
            math.ceil(self.fraction * self.num_clients) if self.fraction and self.num_clients else None
        )

    def _check_secure_aggregation(self) -> None:
        """What SecAgg+ cannot run with, refused before any work."""
        if self.wire_dtype != "fp32":
            raise ValueError(
                f"secure_aggregation quantises the replies itself (secagg_quantization_range levels over "
                f"[-secagg_clipping_range, secagg_clipping_range]); wire_dtype {self.wire_dtype} would code them "
                "twice: set wire_dtype: fp32"
            )
        if self.aggregation != "mean":
            raise ValueError(
                f"secure_aggregation reveals only the weighted average of the replies; aggregation "
                f"{self.aggregation} needs each reply: set aggregation: mean"
            )
        screens = {
            "max_update_norm": self.max_update_norm,
            "clip_update_norm": self.clip_update_norm,
        }
        for name, value in screens.items():
            if value is not None:
                raise ValueError(
                    f"secure_aggregation reveals only the weighted average of the replies, so {name} cannot "
                    f"see one reply's update: remove {name}"
                )
        sampled = self.sampled_per_round()
        if sampled is not None and sampled < 2:
            raise ValueError(
                "secure_aggregation of one client's reply is that reply: sample 2 or more clients a round "
                "(3 or more to survive a dropout)"
            )
        if isinstance(self.secagg_num_shares, float) and self.secagg_num_shares > 1:
            raise ValueError("secagg_num_shares as a fraction is at most 1.0 (or give a count above 2)")
        if isinstance(self.secagg_num_shares, int) and self.secagg_num_shares <= 2:
            raise ValueError("secagg_num_shares as a count must be above 2 (or give a fraction such as 1.0)")
        if (
            isinstance(self.secagg_reconstruction_threshold, float)
            and self.secagg_reconstruction_threshold > 1
        ):
            raise ValueError("secagg_reconstruction_threshold as a fraction is at most 1.0 (or give a count)")


#: the local optimizers: adamw (= adamw_torch), adamw_torch_fused, adamw_8bit / paged_adamw_8bit, sgd
OptimizerName = Literal["adamw", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"]

#: the corruptions a fault plan draws from
Corruption = Literal["nan", "inf", "shape", "rank", "norm"]
CORRUPTIONS: tuple[Corruption, ...] = ("nan", "inf", "shape", "rank", "norm")


class FaultsConfig(Section):
    """Failure injection (embedded engine): fractions of the sampled clients that drop out (no reply),
    straggle past the round deadline (reply discarded) or return a corrupted update of one of ``kinds``."""

    #: share of the sampled clients that send no reply
    dropout: float = Field(0.0, ge=0.0, le=1.0)
    #: share that reply after the round deadline (their reply is discarded)
    straggler: float = Field(0.0, ge=0.0, le=1.0)
    #: share whose reply is corrupted (one of kinds)
    corrupt: float = Field(0.0, ge=0.0, le=1.0)
    #: corruptions to draw from: nan, inf, shape, rank, norm
    kinds: list[Corruption] = Field(default_factory=lambda: list(CORRUPTIONS), min_length=1)
    #: seeds which clients fail and how
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

    #: adamw (= adamw_torch), adamw_torch_fused, adamw_8bit / paged_adamw_8bit (bitsandbytes), sgd
    optimizer: OptimizerName | None = None
    #: the local learning rate (with lr_min: the maximum, FlowerTune's learning-rate-max)
    lr: float = Field(3e-4, gt=0.0)
    #: AdamW's decoupled weight decay, or SGD's L2 term
    weight_decay: float = Field(0.0, ge=0.0)
    #: SGD momentum
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    #: optimizer steps per client per round (FlowerTune's max-steps); or local_epochs
    local_steps: int | None = Field(10, ge=1)
    #: epochs over the client's training data per round, instead of local_steps
    local_epochs: float | None = Field(None, gt=0.0)
    #: examples per micro-batch (TRL's per_device_train_batch_size)
    batch_size: int = Field(4, ge=1)
    #: global-norm gradient clipping of each optimizer step (``max_grad_norm`` is accepted as its other name)
    grad_clip: float | None = Field(1.0, gt=0.0, validation_alias=AliasChoices("grad_clip", "max_grad_norm"))
    #: the learning-rate schedule over a client's optimizer steps in a round (``transformers.get_scheduler``)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    #: lr_scheduler warmup, in optimizer steps of a round
    warmup_steps: int = Field(0, ge=0)
    #: lr_scheduler warmup, as a share of a round's optimizer steps
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    #: exponential decay across rounds: round t trains at lr * lr_decay^(t - 1)
    lr_decay: float = Field(1.0, gt=0.0, le=1.0)
    #: cosine annealing across rounds, FlowerTune's learning-rate-max (``lr``) / learning-rate-min: round t of
    #: T = federation.rounds trains at lr_min + (lr - lr_min) (1 + cos(pi t / T)) / 2 (the last at lr_min)
    lr_min: float | None = Field(None, ge=0.0)
    #: micro-batches of ``batch_size`` per optimizer step (``local_steps`` counts optimizer steps)
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    #: torch threads of the training process
    num_threads: int = Field(1, ge=1, le=256)

    @model_validator(mode="after")
    def _one_length(self) -> ClientConfig:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("give exactly one of local_steps and local_epochs (set the other to null)")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if self.lr_min is not None and self.lr_decay != 1.0:
            raise ValueError("give lr_min (cosine across rounds) or lr_decay (exponential), not both")
        if self.lr_min is not None and self.lr_min > self.lr:
            raise ValueError(
                f"lr_min ({self.lr_min:g}) must not exceed lr ({self.lr:g}), the schedule's maximum"
            )
        return self


class ComputeConfig(Section):
    """Where and how the arithmetic runs (results do not depend on ``workers``; see docs/compute.md).

    ``device``: ``auto`` (the first CUDA GPU, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``: the
    base model, batches, evaluation and generation live there. ``server_device``: where the server's
    aggregation arithmetic runs (FlexLoRA's SVD...; ``auto`` = ``device``). ``precision``: autocast of the
    base model's forward and backward (``bf16``/``fp16``; ``fp16`` with a gradient scaler); LoRA factors,
    optimizer state, aggregation and everything that travels stay float32; ``auto`` (the default): ``bf16``
    where the device has bf16 matrix units (AMX-BF16 / AVX512-BF16 CPUs, CUDA GPUs with native bf16), else
    ``fp32``, chosen when the run starts and written into its config.yaml (``fedlora.compute.resolve_precision``). ``gradient_checkpointing``:
    recompute activations in the backward pass (memory for time, for large models).
    ``workers``: clients of a round trained in parallel worker processes, each with its own model copy
    (``auto``: one per core the machine's memory allows when the model is large enough to pay for the
    processes, else 1; 1 = in this process). ``devices``: one worker per listed device (GPUs).
    ``batch_clients``: all sampled clients' local steps in one forward/backward over the shared base model
    (first-order strategies whose hooks allow it; others fall back to one client at a time with a note).
    """

    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    server_device: str = Field("cpu", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: the frozen base model's linear weights kept in this dtype, cast once when the model loads instead of
    #: at every autocast forward (bf16 / fp16 need precision of the same dtype); LoRA factors, optimizer
    #: state and what travels stay float32
    base_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    workers: int | Literal["auto"] = "auto"
    devices: list[str] = Field(default_factory=list)
    batch_clients: bool = False
    #: engine flower-sim: Ray's servers (GCS, raylet, workers) listen on every interface; ``private`` runs the
    #: simulation in a network namespace of its own (loopback only: nothing is reachable from outside, and
    #: nothing outside is reachable from it, so online trackers need ``host``); where the kernel allows no
    #: namespace it says so and runs on the host network. ``host``: Ray as it comes
    flower_network: Literal["private", "host"] = "private"
    #: engine flower-sim: CPUs each virtual client asks Ray for (Flower's client-resources num-cpus; FlowerTune
    #: sets 6): Ray runs as many clients at once as the cores allow; auto: 1
    flower_client_cpus: int | Literal["auto"] = "auto"
    #: engine flower-sim: GPUs (a share) each virtual client asks Ray for (num-gpus; FlowerTune sets 1.0);
    #: auto: 1 / (clients per round) of the GPU on a CUDA device, 0 on the CPU
    flower_client_gpus: float | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _base_dtype_is_autocast(self) -> ComputeConfig:
        if self.base_dtype != "fp32" and self.precision == "auto":
            # a base kept in bf16 / fp16 runs under that autocast (set in __dict__: an assignment would validate
            # the section again, and so call this validator again)
            self.__dict__["precision"] = self.base_dtype
        if self.base_dtype != "fp32" and self.precision != self.base_dtype:
            raise ValueError(
                f"base_dtype {self.base_dtype} runs under autocast in that dtype: set precision: {self.base_dtype}"
            )
        return self

    @field_validator("flower_client_cpus", "flower_client_gpus")
    @classmethod
    def _client_resources(cls, value: float | str, info: ValidationInfo) -> float | str:
        if not isinstance(value, str) and value < (1 if info.field_name == "flower_client_cpus" else 0):
            least = "1" if info.field_name == "flower_client_cpus" else "0"
            raise ValueError(f"{info.field_name} must be 'auto' or at least {least} (got {value})")
        return value

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


class PrivacyConfig(Section):
    """Differential privacy, of each example (``unit: example``, DP-SGD on every client) or of each client
    (``unit: client``, DP-FedAvg at the server: :mod:`fedlora.strategies.client_privacy`).

    ``unit: client``: every accepted update is clipped to ``clipping_norm`` (fixed, or moved each round
    towards the ``target_clipped_quantile`` of the update norms with ``adaptive_clipping``), the updates are
    averaged with equal weights and Gaussian noise of std ``noise_multiplier x C / m`` is added; ``target_epsilon``
    / ``noise_multiplier`` / ``delta`` / ``accountant`` as below, with client sampling (clients per round /
    clients) as the accountant's rate and one step per round.

    ``unit: example``: DP-SGD through Opacus on the trainable adapter parameters.

    Each local step clips every example's gradient to ``max_grad_norm`` (C) and adds Gaussian noise of
    standard deviation ``noise_multiplier * C`` to their sum. Give the noise multiplier directly, or a
    ``target_epsilon``: then each client gets the smallest noise multiplier for which (epsilon, ``delta``)
    holds after ALL the steps it could take (every round, its local steps per round, sampling rate
    batch_size / n_i), so the budget holds whichever rounds it is sampled in. ``sampling: poisson`` (what
    the accountant assumes) or ``shuffle`` (fixed-size batches; the accountant's figure is then the usual
    approximation). The spent epsilon of each client is tracked by the accountant across rounds.
    """

    #: differential privacy on (of the unit below)
    enabled: bool = False
    #: whom the guarantee protects: example (DP-SGD through Opacus on every client) or client (DP-FedAvg:
    #: each client's update clipped and the average noised at the server)
    unit: Literal["example", "client"] = "example"
    #: the epsilon every client must stay within over all its possible steps; or noise_multiplier
    target_epsilon: float | None = Field(None, gt=0.0)
    #: the delta of (epsilon, delta)-DP
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    #: the noise standard deviation over max_grad_norm; or target_epsilon
    noise_multiplier: float | None = Field(None, gt=0.0)
    #: C: every example's gradient is clipped to this norm
    max_grad_norm: float = Field(1.0, gt=0.0)
    #: poisson (what the accountant assumes) or shuffle (fixed-size batches)
    sampling: Literal["poisson", "shuffle"] = "poisson"
    #: Opacus' accountant: rdp or prv
    accountant: Literal["rdp", "prv"] = "rdp"
    #: the largest noise multiplier target_epsilon may ask for before it is refused
    max_noise_multiplier: float = Field(50.0, gt=0.0)
    #: unit client: C, the norm every client's update (reply - what it was sent) is clipped to (the first
    #: round's with adaptive_clipping)
    clipping_norm: float = Field(1.0, gt=0.0)
    #: unit client: move C each round towards the target quantile of the update norms (Andrew et al. 2021)
    adaptive_clipping: bool = False
    #: unit client, adaptive: the share of updates that should fall within C
    target_clipped_quantile: float = Field(0.5, gt=0.0, lt=1.0)
    #: unit client, adaptive: C <- C exp(-clip_norm_lr (clipped share - target))
    clip_norm_lr: float = Field(0.2, gt=0.0)
    #: unit client, adaptive: std of the noise on the count of unclipped updates (None: clients per round / 20)
    clipped_count_stddev: float | None = Field(None, gt=0.0)

    @property
    def dp_sgd(self) -> bool:
        """Example-level DP: every client's steps are DP-SGD steps."""
        return self.enabled and self.unit == "example"

    @property
    def client_level(self) -> bool:
        """Client-level DP: the server clips and noises the clients' updates (DP-FedAvg)."""
        return self.enabled and self.unit == "client"

    @model_validator(mode="after")
    def _one_noise_rule(self) -> PrivacyConfig:
        if self.enabled and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("with enabled: true give exactly one of target_epsilon and noise_multiplier")
        return self


class StrategyConfig(Section):
    """The federated method: ``name`` is a registered strategy; ``options`` are its own settings."""

    #: a registered strategy (fedlora --help lists them): fedit, flexlora, hetlora, ... or your own
    name: str = "fedit"
    #: the strategy's own settings (strategy.options.mu=0.01); docs/methods.md lists each method's
    options: dict[str, float | int | str | bool | None] = Field(default_factory=dict)
