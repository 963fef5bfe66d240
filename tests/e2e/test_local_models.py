"""The example configs for the models users bring (configs/local-*.yaml) run as shipped on a local folder of
that architecture (tiny random Llama, Qwen2 and GPT-2 here), and the exported adapter loads with plain PEFT
and gives the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from conftest import REPO, assert_rel_close
from fedlora import load_config, run
from fedlora.models.folders import save_model_folder
from fedlora.models.tiny import build_tiny_llama_folder, byte_level_tokenizer


def local_folder(kind: str, target: Path) -> Path:
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    if kind == "llama":
        return build_tiny_llama_folder(target)
    if kind == "qwen":
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
        return save_model_folder(target, Qwen2ForCausalLM(config), tokenizer)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return save_model_folder(target, GPT2LMHeadModel(config), tokenizer)


@pytest.mark.parametrize("kind", ["llama", "qwen", "gpt2"])
def test_an_example_config_runs_on_a_local_folder_and_exports_to_plain_peft(
    tmp_path: Path, kind: str
) -> None:
    folder = local_folder(kind, tmp_path / kind)
    overrides = [
        f"model.name={folder}",
        "data.source=reasoning-gym",
        "data.tasks=[gcd, lcm]",
        "data.examples_per_task=8",
        "data.max_seq_len=64",
        "federation.num_clients=null",
        "federation.fraction=1.0",
        "federation.rounds=1",
        "client.local_steps=1",
        "adapter.rank=2",
        "output.plot=false",
    ]
    cfg = load_config(REPO / "configs" / f"local-{kind}.yaml", overrides)
    result = run(cfg, tmp_path / "run", show_progress=False)
    state = load_file(str(result.run_dir / "global" / "adapter_model.safetensors"))
    modules = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in state}
    assert modules == set(cfg.adapter.target_modules)  # every named projection carries LoRA
    ids = torch.tensor([[5, 17, 42, 99, 3, 25]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(folder)
        plain = PeftModel.from_pretrained(base, str(result.run_dir / "global")).eval()
        theirs = plain(input_ids=ids).logits
        from fedlora.adapters.lora import LoraAdapters
        from fedlora.models.loading import load_base_model

        ours_adapters = LoraAdapters(load_base_model(cfg.model).model, cfg.adapter, "causal-lm")
        ours_adapters.load(state)
        ours = ours_adapters.model.eval()(input_ids=ids).logits
    assert_rel_close(theirs, ours, 1e-5)
