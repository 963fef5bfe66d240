"""The head-on-targets loss equals Hugging Face's own causal-LM loss (value and gradients)."""

import pytest
import torch

from conftest import assert_rel_close
from fedlora.adapters import LoraAdapters
from fedlora.client import loss as loss_module
from fedlora.client.loss import batch_loss, example_losses
from fedlora.config.schema import AdapterConfig, ModelConfig
from fedlora.data.encoding import collate
from fedlora.models import load_base_model


def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    items = []
    for length, prompt in ((12, 5), (7, 3), (9, 9 - 2)):
        ids = torch.randint(4, 250, (length,), generator=gen).tolist()
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return collate(items, pad_token_id=0)


@pytest.fixture()
def peft_model() -> torch.nn.Module:
    bundle = load_base_model(ModelConfig(name="tiny-llama"))
    adapters = LoraAdapters(bundle.model, AdapterConfig(rank=4, dropout=0.0), "causal-lm")
    state = adapters.initial_state()
    gen = torch.Generator().manual_seed(1)
    adapters.load({k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()})
    return adapters.model


def test_fast_loss_equals_hf_loss_and_gradients(peft_model: torch.nn.Module) -> None:
    b = batch()
    reference = peft_model(**b).loss
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.zero_grad()
    ours = batch_loss(peft_model, b, "causal-lm")
    ours.backward()
    assert loss_module._FAST_PATH_AGREES[type(peft_model.get_base_model())] is True
    assert_rel_close(ours, reference, 1e-5)
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            assert_rel_close(p.grad, ref_grads[n], 1e-4)


def test_example_losses_are_row_means(peft_model: torch.nn.Module) -> None:
    b = batch()
    losses, predicted = example_losses(peft_model, b, "causal-lm")
    assert predicted is None and losses.shape == (3,)
    for row in range(3):
        one = {k: v[row : row + 1] for k, v in b.items()}
        assert_rel_close(losses[row], peft_model(**one).loss, 1e-5)


def test_disagreeing_model_class_falls_back(
    peft_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose logits are not head(h) (here: scaled) is detected and uses its own logits."""
    lm = peft_model.get_base_model()
    original_forward = type(lm).forward

    class ScaledLogits(type(lm)):
        def forward(self, *args, **kwargs):
            out = original_forward(self, *args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    monkeypatch.setattr(lm, "__class__", ScaledLogits)
    b = batch()
    ours = batch_loss(peft_model, b, "causal-lm")
    assert loss_module._FAST_PATH_AGREES[ScaledLogits] is False
    inputs = {k: v for k, v in b.items() if k != "labels"}
    logits = peft_model(**inputs).logits[:, :-1].float()
    targets = b["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )
    assert_rel_close(ours, expected, 1e-5)
