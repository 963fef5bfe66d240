"""model.quantization (QLoRA-style 4-bit NF4 / 8-bit base models through bitsandbytes, which runs on the CPU
too): the adapter trains on the quantized base, and the exported adapter loads with plain transformers + PEFT
on the same quantized base and gives the same logits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from conftest import assert_rel_close, relative_error, tiny_overrides
from fedlora import load_config
from fedlora.adapters import LoraAdapters
from fedlora.config.loader import ConfigError
from fedlora.models.loading import load_base_model
from fedlora.runner import run_experiment

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("bits", [4, 8])
def test_adapter_trains_on_a_quantized_base_and_exports_to_plain_peft(tmp_path: Path, bits: int) -> None:
    cfg = load_config(None, tiny_overrides(tmp_path, **{"model.quantization": bits, "compute.workers": 1}))
    run_dir = run_experiment(cfg, tmp_path / "run", show_progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["aggregated", "aggregated"]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in records)

    bundle = load_base_model(cfg.model)
    linear = bundle.model.model.layers[0].self_attn.q_proj
    assert not linear.weight.dtype.is_floating_point  # the base weights really are 4/8-bit integers
    adapters = LoraAdapters(bundle.model, cfg.adapter, "causal-lm")
    trained = load_file(str(run_dir / "global" / "adapter_model.safetensors"))
    assert sum(float(v.norm()) for k, v in trained.items() if "lora_B" in k) > 0  # B left its zero init
    adapters.load(trained)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        ours = adapters.model(input_ids=ids).logits
        quantization = (
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            )
            if bits == 4
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        base = AutoModelForCausalLM.from_pretrained(
            bundle.folder, quantization_config=quantization, device_map={"": "cpu"}
        )
        theirs = PeftModel.from_pretrained(base, str(run_dir / "global")).eval()(input_ids=ids).logits
        full = AutoModelForCausalLM.from_pretrained(bundle.folder)
        full_precision = PeftModel.from_pretrained(full, str(run_dir / "global")).eval()(input_ids=ids).logits
    assert_rel_close(ours, theirs, 1e-5)
    # the same adapter on the unquantized base: close (quantization error only), not equal
    assert 0 < relative_error(full_precision, ours) < 0.5


def test_a_strategy_that_trains_base_weights_is_refused_on_a_quantized_base(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            **{
                "model.quantization": 4,
                "strategy.name": "fedmezo",
                "strategy.options.full_parameters": "true",
                "compute.workers": 1,
            },
        ),
    )
    with pytest.raises(
        Exception, match=r"model.quantization: this strategy trains the base model's own weights"
    ):
        run_experiment(cfg, tmp_path / "run", show_progress=False)
    with pytest.raises(ConfigError, match="model.quantization cannot be combined with model.variants"):
        load_config(
            None, tiny_overrides(tmp_path, **{"model.quantization": 4, "model.variants": "[{num_layers: 1}]"})
        )


def test_missing_bitsandbytes_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = load_config(None, tiny_overrides(tmp_path, **{"model.quantization": 4}))
    with pytest.raises(ConfigError, match=r"needs the bitsandbytes package: pip install 'fedlora\[qlora\]'"):
        load_base_model(cfg.model)
