"""Devices, precision and worker counts: ``compute`` in the config, resolved once per process.

Rules (docs/compute.md):

- ``device: auto`` is the first CUDA GPU if torch sees one, else the CPU; a named CUDA/MPS device that torch
  does not see is a :class:`~fedlora.config.loader.ConfigError`, before any model loads.
- Tensors that leave the device (payloads, replies, checkpoints, personal state, exports) are CPU float32
  whatever the device: :func:`to_cpu`.
- ``precision`` is autocast of the forward pass (and so of its backward) in ``bf16``/``fp16``; parameters,
  gradients and optimizer state stay float32. ``fp16`` gets a gradient scaler (:func:`grad_scaler`).
  ``precision: auto`` (the default) is ``bf16`` where the device has bf16 matrix units (a CPU with AMX-BF16 or
  AVX512-BF16, a CUDA GPU with native bf16), else ``fp32``: a CPU without them runs bf16 products in software,
  about 35x slower than fp32 (:func:`resolve_precision`). A run resolves it once, on the device it trains on,
  and writes the value it chose into its ``config.yaml`` (a resume keeps it).
- ``workers: auto`` = min(cores, memory / (4 x model bytes), sampled clients), and 1 below
  :data:`PARALLEL_MIN_PARAMETERS` parameters, where starting processes costs more than it saves.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import resource
from collections.abc import Iterator, Mapping
from typing import Any

import torch


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """For the duration of a library call (``fedlora.run``, ``fedlora.evaluate``): transformers' loading
    bars and info logs off and the libraries' FutureWarnings (deprecations a user of fedlora cannot act
    on) ignored; the previous settings come back afterwards. The CLI does the same before any import."""
    import warnings

    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


#: below this many base-model parameters ``workers: auto`` stays in process (tiny test models)
PARALLEL_MIN_PARAMETERS = 20_000_000

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: what ``precision: auto`` takes the hardware to have, where set: ``1`` bf16 matrix units, ``0`` none (the
#: test suite sets 0 so that every CPU runs it alike, and fakes 1 to test the choice); unset: detected
BF16_UNITS_ENV = "FEDLORA_BF16_UNITS"

#: /proc/cpuinfo flags of a CPU whose bf16 matrix products run in hardware (Intel AMX tiles; AVX512-BF16 dot
#: products on Intel Cooper Lake and later and AMD Zen 4 and later)
CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda:0 or cpu; a named device is checked to exist (one clear line if it does not)."""
    from fedlora.errors import ConfigError

    if name == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"compute.device: {name!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                "use compute.device: auto or cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"compute.device: {name!r} asked for, but torch sees {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"compute.device: {name!r} asked for, but MPS is not available here; use auto or cpu"
        )
    return device


@functools.cache
def _proc_cpuinfo() -> str:
    """/proc/cpuinfo's text, read once per process ("" where there is no such file, as on macOS or Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def first_processor(cpuinfo: str | None = None) -> dict[str, str]:
    """The fields of the first processor's block of /proc/cpuinfo (``cpuinfo``: that file's text)."""
    fields: dict[str, str] = {}
    for line in (cpuinfo if cpuinfo is not None else _proc_cpuinfo()).splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The first processor's ``flags`` in /proc/cpuinfo (``cpuinfo``: that file's text; none where there is
    no such file)."""
    return frozenset(first_processor(cpuinfo).get("flags", "").split())


def has_bf16_matrix_units(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU with native bf16 (compute
    capability 8.0 and later; not the emulation older cards allow), a CPU with a flag of
    :data:`CPU_BF16_FLAGS`; MPS and others: no. :data:`BF16_UNITS_ENV` overrides the detection."""
    override = os.environ.get(BF16_UNITS_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return bool(cpu_flags() & CPU_BF16_FLAGS)
    return False


def resolve_precision(precision: str, device: str) -> str:
    """``precision`` as it runs on the device named ``device`` (``compute.device``): ``auto`` becomes ``bf16``
    where :func:`has_bf16_matrix_units`, else ``fp32``; any other value is returned as it is."""
    if precision != "auto":
        return precision
    return "bf16" if has_bf16_matrix_units(resolve_device(device)) else "fp32"


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (where its inputs must be)."""
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (the same objects when they are already there)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def weight_of(module: torch.nn.Module) -> torch.Tensor:
    """A layer's ``weight`` tensor (typed: ``nn.Module`` attributes read as tensor-or-module)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor), f"{type(module).__name__} has no weight tensor"
    return weight


def to_cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies (what travels and what is written, whatever the compute device)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """Autocast to ``precision`` on ``device`` (nothing for fp32)."""
    if precision == "fp32":
        yield
        return
    kind = torch.device(device).type
    with torch.autocast(device_type=kind, dtype=_DTYPES[precision]):
        yield


def grad_scaler(precision: str, device: torch.device | str) -> Any:
    """A gradient scaler for fp16 (None otherwise): loss scaled up before backward, gradients unscaled
    before clipping, steps with inf/NaN gradients skipped."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def process_peak_memory() -> dict[str, float]:
    """This process's peak memory so far, in MB: ``peak_rss_mb`` (resident, ``ru_maxrss``) and, where CUDA is
    in use, ``peak_gpu_mb`` (``torch.cuda.max_memory_allocated``). Each client reports it for the process that
    trained it (a worker's own peak), so a run's peak covers its training, not only its server."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model_name() -> str:
    """The CPU's model name with its family and model numbers, which tell apart the generations that a
    virtual machine's generic name hides: ``Intel(R) Xeon(R) Processor (family 6, model 207)`` from the first
    processor of /proc/cpuinfo; ``platform.processor()`` where there is none."""
    fields = first_processor()
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def describe_machine(device: torch.device) -> dict[str, Any]:
    """What a run's measured figures (seconds, memory) come from: ``{"cpu", "cores", "memory_gib", "device",
    "torch"}``, with the GPU's name as ``device`` when the run trains on one. JSON-serialisable."""
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # not POSIX
        memory_gib = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {
        "cpu": cpu_model_name(),
        "cores": usable_cores(),
        "memory_gib": memory_gib,
        "device": name,
        "torch": torch.__version__,
    }


def auto_workers(num_parameters: int, per_round: int, device: torch.device) -> int:
    """How many worker processes ``workers: auto`` starts (see the module docstring)."""
    if device.type != "cpu" or num_parameters < PARALLEL_MIN_PARAMETERS:
        return 1  # one GPU: one process feeds it; tiny models: process start-up dominates
    memory = available_memory_bytes()
    by_memory = max(1, memory // (4 * 4 * num_parameters)) if memory else usable_cores()
    return max(1, min(usable_cores(), by_memory, per_round))
