"""Client-side DP-SGD with Opacus: per-example clipping and Gaussian noise on the trainable adapter.

One DP step on a batch b (Poisson-sampled: each example in with probability q = batch_size / n):

    g_i = grad of example i's loss,      g_i <- g_i * min(1, C / ||g_i||)         (all trainable tensors as one vector)
    update direction = (sum_i g_i + N(0, sigma^2 C^2 I)) / batch_size           (Opacus' DPOptimizer)

Per-example gradients come from Opacus' ``GradSampleModule`` hooks on the modules that own trainable
parameters (LoRA's ``lora_A`` / ``lora_B`` linears, task heads); those module types must be ones Opacus has a
per-sample gradient rule for, which :func:`check_dp_support` verifies before any training. The training
loss under DP is the mean over examples of each example's own loss (mean over its target tokens), so each
example's gradient is its own.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch


def _grad_samplers() -> dict[type, object]:
    from opacus import GradSampleModule

    return GradSampleModule.GRAD_SAMPLERS


def trainable_owner_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules that directly own a trainable parameter, by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    }


def check_dp_support(model: torch.nn.Module) -> None:
    """Raise ValueError naming the first module with trainable parameters that Opacus cannot handle."""
    samplers = _grad_samplers()
    for name, module in trainable_owner_modules(model).items():
        if type(module) not in samplers:
            supported = sorted({t.__name__ for t in samplers})
            raise ValueError(
                f"privacy.enabled: Opacus has no per-example gradient rule for {name} "
                f"({type(module).__module__}.{type(module).__name__}), which holds trainable parameters; "
                f"supported layer types: {', '.join(supported)}. Change adapter.target_modules "
                f"(e.g. only linear layers) or turn privacy off."
            )


@contextlib.contextmanager
def per_example_gradients(model: torch.nn.Module) -> Iterator[None]:
    """Opacus hooks on ``model`` for the duration (each trainable tensor gets ``grad_sample``)."""
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    try:
        with warnings.catch_warnings():  # lora_A's input (the frozen layer input) needs no gradient: expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield
    finally:
        wrapped._close()  # removes the hooks and the grad_sample attributes
        for p in model.parameters():
            if hasattr(p, "grad_sample"):
                del p.grad_sample


def dp_optimizer(
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    seed: int,
    device: torch.device | None = None,
) -> torch.optim.Optimizer:
    """Opacus' DPOptimizer around ``optimizer``; the noise is drawn from a generator seeded per (round, client)
    on the parameters' ``device`` (so a GPU run draws other, equally distributed, noise than a CPU run)."""
    from opacus.optimizers import DPOptimizer

    return DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=torch.Generator(device=device or "cpu").manual_seed(seed ^ 0x5EED),
    )


def poisson_batches(
    num_examples: int, sample_rate: float, steps: int, generator: torch.Generator
) -> list[list[int]]:
    """``steps`` batches, each holding every example independently with probability ``sample_rate``."""
    return [
        torch.nonzero(torch.rand(num_examples, generator=generator) < sample_rate).flatten().tolist()
        for _ in range(steps)
    ]


def zero_grad_samples(params: Sequence[torch.Tensor]) -> None:
    """An empty Poisson batch: every example contributes nothing; the step still adds the noise."""
    for p in params:
        p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]  # Opacus' per-example gradient slot
        p.grad = torch.zeros_like(p)
