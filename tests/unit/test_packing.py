"""data.packing: a training batch's examples packed into rows without cross-example attention, so that the
loss and its gradients equal the unpacked batch's; refused where it would change what is computed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_rel_close, relative_error, tiny_overrides
from fedlora import load_config
from fedlora.adapters import LoraAdapters
from fedlora.client.loss import batch_loss
from fedlora.config.loader import ConfigError
from fedlora.config.schema import AdapterConfig, ModelConfig
from fedlora.data.encoding import Encoder, collate, pack
from fedlora.data.sources import reasoning_gym_examples
from fedlora.models.loading import load_base_model
from fedlora.runner import run_experiment


def test_pack_places_segments_block_diagonally_with_restarting_positions() -> None:
    items = [
        {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]},
        {"input_ids": [21, 22, 23, 24, 25], "labels": [21, 22, 23, 24, 25]},
        {"input_ids": [31, 32], "labels": [-100, 32]},
    ]
    batch = pack(items, pad_token_id=0, capacity=8)
    # first-fit decreasing: [5-token, 3-token] in row 0, the 2-token example in row 1; width = 8
    assert batch["input_ids"].tolist() == [[21, 22, 23, 24, 25, 11, 12, 13], [31, 32, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    # each segment's first label is never a target (the shift never reads it in an unpacked row either)
    assert batch["labels"][0].tolist() == [-100, 22, 23, 24, 25, -100, 12, 13]
    mask = batch["attention_mask"][0, 0]
    assert mask.shape == (8, 8)
    assert mask[6].tolist() == [False] * 5 + [True, True, False]  # segment 2 sees only itself, causally
    assert mask[4].tolist() == [True] * 5 + [False] * 3
    assert batch["attention_mask"][1, 0].diagonal().all()  # padding attends to itself: no empty row


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_packed_loss_and_gradients_equal_the_unpacked_batch(train_on_inputs: bool) -> None:
    bundle = load_base_model(ModelConfig(name="tiny-llama"))
    adapters = LoraAdapters(bundle.model, AdapterConfig(rank=4, dropout=0.0), "causal-lm")
    gen = torch.Generator().manual_seed(0)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in adapters.initial_state().items()}
    adapters.load(state)
    examples = reasoning_gym_examples(["basic_arithmetic", "gcd", "chain_sum"], 3, seed=0)
    encoder = Encoder(bundle.tokenizer, "causal-lm", 512, "alpaca", train_on_inputs, packing=True)
    items = encoder.encode_all(examples)
    packed, padded = encoder.training_batch(items), collate(items, bundle.tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # really fewer rows
    params = [p for _, p in adapters.trainable_parameters()]
    model = adapters.model

    def loss_and_grads(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss = batch_loss(model, batch, "causal-lm")
        return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, params)]

    loss_packed, grads_packed = loss_and_grads(packed)
    loss_padded, grads_padded = loss_and_grads(padded)
    assert_rel_close(loss_packed, loss_padded, 1e-5)
    assert_rel_close(
        torch.cat([g.flatten() for g in grads_packed]), torch.cat([g.flatten() for g in grads_padded]), 1e-4
    )
    # the mask matters: the same packed rows with plain (all-visible) attention give another loss
    leaky = {**packed, "attention_mask": torch.ones(packed["input_ids"].shape, dtype=torch.long)}
    leaky.pop("position_ids")
    assert relative_error(batch_loss(model, leaky, "causal-lm").detach(), loss_padded) > 1e-4


def test_a_packed_run_trains_the_same_adapter(tmp_path: Path) -> None:
    adapters = {}
    for packing in ("false", "true"):
        cfg = load_config(
            None,
            tiny_overrides(
                tmp_path,
                **{
                    "data.packing": packing,
                    "data.max_seq_len": 512,
                    "adapter.dropout": 0.0,
                    "compute.workers": 1,
                },
            ),
        )
        run_dir = run_experiment(cfg, tmp_path / packing, show_progress=False)
        adapters[packing] = load_file(str(run_dir / "global" / "adapter_model.safetensors"))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(r["status"] == "aggregated" for r in records)
    flat = {p: torch.cat([t.flatten() for _, t in sorted(a.items())]) for p, a in adapters.items()}
    assert_rel_close(flat["true"], flat["false"], 1e-4)


def test_packing_is_refused_where_it_would_change_the_computation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.packing cannot be used with privacy.enabled"):
        load_config(
            None,
            tiny_overrides(
                tmp_path,
                **{"data.packing": "true", "privacy.enabled": "true", "privacy.noise_multiplier": 1.0},
            ),
        )
    with pytest.raises(ConfigError, match="data.packing is for model.task causal-lm"):
        load_config(
            None,
            tiny_overrides(
                tmp_path,
                **{"data.packing": "true", "model.task": "classification", "data.source": "bbc-news"},
            ),
        )
