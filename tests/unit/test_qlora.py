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
from fedlora.cli import main
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

    # `fedlora export --merged`: the quantised base dequantised, the adapter merged in full precision. Its
    # logits are those of the adapter (unmerged) on a float32 model holding the dequantised weights
    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--merged", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(merged.config, "quantization_config", None) is None
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    fresh = AutoModelForCausalLM.from_pretrained(
        bundle.folder, quantization_config=quantization, device_map={"": "cpu"}
    )
    dequantised = dequantised_dense(fresh, AutoModelForCausalLM.from_pretrained(bundle.folder))
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
        base_logits = dequantised(input_ids=ids).logits
        adapter_logits = (
            PeftModel.from_pretrained(dequantised, str(run_dir / "global")).eval()(input_ids=ids).logits
        )
    assert_rel_close(merged_logits, adapter_logits, 1e-4)
    # the adapter's whole effect survives the merge (a re-quantised merge kept about a quarter of it)
    assert relative_error(merged_logits - base_logits, adapter_logits - base_logits) < 1e-2


def dequantised_dense(quantized: torch.nn.Module, dense: torch.nn.Module) -> torch.nn.Module:
    """``dense`` (a float32 copy of the architecture) holding ``quantized``'s weights dequantised by
    bitsandbytes' own functions: NF4 blocks times their scales, or int8 rows times SCB / 127."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    replaced = 0
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weights = module.weight.data.float() * module.weight.SCB.float()[:, None] / 127.0
        else:
            continue
        dense.get_submodule(name).weight.data.copy_(weights.float())
        replaced += 1
    assert replaced
    return dense.eval()


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


def test_a_4bit_cpu_base_gives_the_dequantised_weights_gradients_and_one_token_logits(tmp_path: Path) -> None:
    """bitsandbytes warns on the CPU that its gemv_4bit kernel (one token at a time: generation) may be
    "silently incorrect". Checked here against the same NF4 weights dequantised into a float32 model: the
    LoRA gradients of a training batch and the logits of single-token steps agree to float32 rounding."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from fedlora.config.schema import AdapterConfig

    cfg = load_config(None, tiny_overrides(tmp_path, **{"model.quantization": 4}))
    quantized = load_base_model(cfg.model).model
    dense = load_base_model(cfg.model.model_copy(update={"quantization": None})).model
    replaced = 0
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            dense.get_submodule(name).weight.data.copy_(weights)
            replaced += 1
    assert replaced
    results = []
    for model in (quantized, dense):
        adapters = LoraAdapters(model, AdapterConfig(rank=4, dropout=0.0), "causal-lm")
        state = {
            k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) * 0.05
            for i, (k, v) in enumerate(sorted(adapters.initial_state().items()))
        }
        adapters.load(state)
        peft_model = adapters.model
        ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])
        loss = peft_model(input_ids=ids, labels=ids).loss
        params = [p for _, p in adapters.trainable_parameters()]
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            one_token = torch.cat([peft_model(input_ids=ids[:, i : i + 1]).logits for i in range(4)])
        results.append((loss.detach(), grads, one_token))
    (loss_q, grads_q, tok_q), (loss_d, grads_d, tok_d) = results
    # a training batch dequantises the NF4 weights to float32 and multiplies in float32 on every CPU
    assert_rel_close(loss_q, loss_d, 1e-4)
    for gq, gd in zip(grads_q, grads_d, strict=True):
        assert_rel_close(gq, gd, 1e-3)
    assert_rel_close(tok_q, tok_d, one_token_tolerance())


def one_token_tolerance() -> float:
    """The bound for single-token (gemv_4bit) logits, derived from the kernel's own compute dtype, not measured
    on one machine. Where the CPU has AVX512-BF16 (``bitsandbytes.functional.has_avx512bf16``), bitsandbytes'
    CPU gemv_4bit casts the activations and scales to bfloat16 and returns bfloat16 (backends/cpu/ops.py,
    "cpu fused op only support bf16"): each of the model's matmuls then carries a relative error up to a few
    bfloat16 units (2^-8 each for the input, the scales and the output rounding), so the logits after the tiny
    model's two layers are bounded by 8 x 2^-8 ~ 3%. Elsewhere the kernel dequantises to float32 and the bound
    is float32 accumulation over the dequantised weights, 1e-3. A wrong kernel (what bitsandbytes' warning is
    about) is off by O(1), far above either."""
    from bitsandbytes.functional import has_avx512bf16

    return 8 * 2.0**-8 if has_avx512bf16() else 1e-3


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_the_4bit_settings_reach_bitsandbytes(tmp_path: Path, quant_type: str, double_quant: bool) -> None:
    """model.quant_type / double_quant are the BitsAndBytesConfig's (FlowerTune's recipe: fp4, single)."""
    import bitsandbytes as bnb

    extra = {"model.quantization": 4, "model.quant_type": quant_type, "model.double_quant": double_quant}
    model = load_base_model(load_config(None, tiny_overrides(tmp_path, **extra)).model).model
    states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert states and all(s.quant_type == quant_type for s in states)
    assert all(bool(s.nested) == double_quant for s in states)
    with pytest.raises(Exception, match="model.quant_type sets up 4-bit weights"):
        load_config(None, tiny_overrides(tmp_path, **{"model.quant_type": "fp4"}))
