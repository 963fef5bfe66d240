import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import assert_rel_close, relative_error
from fedlora.adapters import LoraAdapters, from_bytes, lora_ranks, to_bytes, wire_size
from fedlora.adapters.export import export_peft_adapter
from fedlora.adapters.ranks import RankProfile
from fedlora.config.schema import AdapterConfig, ModelConfig
from fedlora.models import load_base_model


def perturbed(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def test_state_round_trip_and_rank_slots() -> None:
    bundle = load_base_model(ModelConfig(name="tiny-llama"))
    adapters = LoraAdapters(
        bundle.model, AdapterConfig(rank=4, target_modules=["q_proj", "v_proj"]), "causal-lm"
    )
    init = adapters.initial_state()
    assert set(lora_ranks(init).values()) == {4}
    assert all(torch.count_nonzero(v) == 0 for k, v in init.items() if "lora_B" in k)
    trained = perturbed(init)
    adapters.load(trained)
    assert all(torch.equal(adapters.state()[k], trained[k]) for k in trained)
    # a second rank lives in its own slot of the same model; the first is untouched
    other = adapters.initial_state(8)
    assert set(lora_ranks(other).values()) == {8}
    assert adapters.load(trained) == RankProfile.uniform(4) and all(
        torch.equal(adapters.state()[k], trained[k]) for k in trained
    )
    assert from_bytes(to_bytes(trained)).keys() == trained.keys()
    assert wire_size(trained) == len(to_bytes(trained))


def test_initial_state_is_seeded() -> None:
    a = LoraAdapters(
        load_base_model(ModelConfig(name="tiny-llama")).model, AdapterConfig(rank=4, init_seed=7), "causal-lm"
    ).initial_state()
    b = LoraAdapters(
        load_base_model(ModelConfig(name="tiny-llama")).model, AdapterConfig(rank=4, init_seed=7), "causal-lm"
    ).initial_state()
    c = LoraAdapters(
        load_base_model(ModelConfig(name="tiny-llama")).model, AdapterConfig(rank=4, init_seed=8), "causal-lm"
    ).initial_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("use_rslora", "use_dora"), [(False, False), (True, False), (False, True)], ids=["lora", "rslora", "dora"]
)
def test_peft_export_loads_with_plain_peft_and_gives_same_logits(
    tmp_path: Path, use_rslora: bool, use_dora: bool
) -> None:
    bundle = load_base_model(ModelConfig(name="tiny-llama"))
    cfg = AdapterConfig(rank=4, alpha=8, use_rslora=use_rslora, use_dora=use_dora)
    adapters = LoraAdapters(bundle.model, cfg, "causal-lm")
    state = perturbed(adapters.initial_state(), seed=3)
    assert any("lora_magnitude_vector" in k for k in state) is use_dora  # DoRA's m travels with A and B
    export_peft_adapter(adapters, state, tmp_path / "global", str(bundle.folder))
    config = json.loads((tmp_path / "global" / "adapter_config.json").read_text())
    assert config["use_rslora"] is use_rslora  # plain PEFT then scales by alpha / sqrt(r), as fedlora did
    assert config["use_dora"] is use_dora
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        ours = adapters.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(bundle.folder)
        plain = PeftModel.from_pretrained(base, str(tmp_path / "global")).eval()
        theirs = plain(input_ids=ids).logits
        merged = plain.merge_and_unload()(input_ids=ids).logits
    assert_rel_close(ours, theirs, 1e-5)
    assert_rel_close(ours, merged, 1e-5)
    base_only = AutoModelForCausalLM.from_pretrained(bundle.folder)(input_ids=ids).logits
    assert relative_error(ours, base_only) > 1e-3  # the adapter really changes the output


def test_classification_export_includes_head(tmp_path: Path) -> None:
    bundle = load_base_model(ModelConfig(name="tiny-llama", task="classification"), num_labels=3)
    adapters = LoraAdapters(bundle.model, AdapterConfig(rank=2), "classification")
    state = perturbed(adapters.initial_state(), seed=1)
    assert any("score" in k for k in state)
    export_peft_adapter(adapters, state, tmp_path / "g", str(bundle.folder))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ours = adapters.model(input_ids=ids).logits
        base = AutoModelForSequenceClassification.from_pretrained(bundle.folder, num_labels=3)
        base.config.pad_token_id = 0
        theirs = PeftModel.from_pretrained(base, str(tmp_path / "g")).eval()(input_ids=ids).logits
    assert_rel_close(ours, theirs, 1e-5)


def test_a_constant_scale_holds_at_every_rank_and_exports_to_plain_peft(tmp_path: Path) -> None:
    """adapter.scale = 2 (FLoRA's reference): s = 2 on attention (rank 4) and MLP (rank 2) modules alike, the
    forward equals W0 x + 2 B A x computed by hand, and plain PEFT loads the export to the same logits."""
    bundle = load_base_model(ModelConfig(name="tiny-llama"))
    cfg = AdapterConfig(rank=4, alpha=16, scale=2.0, dropout=0.0, target_modules=["q_proj", "up_proj"])
    adapters = LoraAdapters(bundle.model, cfg, "causal-lm")
    profile = RankProfile(4, 2)
    adapters.activate(profile)
    state = perturbed(adapters.initial_state(profile), seed=5)
    adapters.load(state)
    scales = {
        name: layer.scaling[adapters.active_slot_name]
        for name, (layer, _, _) in adapters.lora_modules().items()
    }
    assert (
        set(scales.values()) == {2.0}
        and any("up_proj" in n for n in scales)
        and any("q_proj" in n for n in scales)
    )
    name, (layer, a_key, b_key) = next((n, v) for n, v in adapters.lora_modules().items() if "up_proj" in n)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        by_hand = layer.base_layer(x) + 2.0 * x @ state[a_key].T @ state[b_key].T
        assert_rel_close(layer(x), by_hand, 1e-5)
    export_peft_adapter(adapters, state, tmp_path / "g", str(bundle.folder))
    config = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 8.0 and list(config["alpha_pattern"].values()) == [4.0]
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        ours = adapters.model(input_ids=ids).logits
        plain = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(bundle.folder), str(tmp_path / "g")
        )
        assert_rel_close(ours, plain.eval()(input_ids=ids).logits, 1e-5)
    with pytest.raises(ValueError, match="exclude each other"):
        AdapterConfig(scale=1.0, use_rslora=True)


def test_a_wrong_target_module_lists_the_models_linear_modules() -> None:
    bundle = load_base_model(ModelConfig(name="tiny-llama"))
    adapters = LoraAdapters(bundle.model, AdapterConfig(target_modules=["c_attn"]), "causal-lm")
    with pytest.raises(ValueError, match=r"target_modules \['c_attn'\]: no such module.*down_proj, .*q_proj"):
        adapters.initial_state()
