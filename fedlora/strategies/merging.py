"""What FLoRA and FedEx-LoRA share: each round part of the aggregate is merged into the frozen base weights.

The server keeps the merged offset as a :class:`~fedlora.adapters.merged.MergeHistory` (a dense snapshot and
the factored increments since) and sends it with every payload, so any client rebuilds W0 + D exactly; the
clients train an ordinary LoRA on top and send only the adapter. Evaluation and export see the same merged
base: ``global/`` is a whole merged model folder (W0 + D + s B A), loadable with plain transformers, not a
PEFT adapter (a merged base cannot be expressed as a rank-r adapter). Causal-LM only, full-precision base
only (a quantized weight cannot take an exact offset).
"""

from __future__ import annotations

import torch

from fedlora.adapters.merged import MergeHistory, split_merged
from fedlora.adapters.state import AdapterState, clone_state
from fedlora.strategies.base import (
    ClientInstruction,
    ExperimentFacts,
    OptionsT,
    Strategy,
)


class MergingStrategy(Strategy[OptionsT]):
    """Base of methods that merge into the base weights: the offset travels and is checkpointed with the
    adapter; replies are checked against the adapter part of the payload."""

    def __init__(self, options: OptionsT | None = None) -> None:
        super().__init__(options)
        self.history = MergeHistory()

    @classmethod
    def refusal(cls, facts: ExperimentFacts, options: OptionsT) -> str | None:
        if facts.task != "causal-lm":
            return (
                f"config field 'model.task': strategy {cls.name} merges into the base weights and exports a "
                "merged causal LM; use it with model.task: causal-lm"
            )
        if facts.quantized:
            return (
                f"config field 'model.quantization': strategy {cls.name} adds its merged updates to the base "
                "weights, which a quantized base cannot hold exactly; set model.quantization: null"
            )
        if facts.base_dtype != "fp32":
            return (
                f"config field 'compute.base_dtype': strategy {cls.name} adds its merged updates to the base "
                f"weights, which {facts.base_dtype} would round; set compute.base_dtype: fp32"
            )
        return super().refusal(facts, options)

    def client_payload(self, server_round: int, client_id: int) -> AdapterState:
        """The adapter client ``client_id`` starts from (default: the global adapter)."""
        return self.global_state

    def configure(self, server_round: int, client_ids: list[int]) -> dict[int, ClientInstruction]:
        hooks = self.client_hooks()
        merged = self.history.payload()
        return {
            cid: ClientInstruction({**self.client_payload(server_round, cid), **merged}, hooks=hooks)
            for cid in client_ids
        }

    def evaluation_state(self) -> AdapterState:
        return {**self.global_state, **self.history.payload()}

    def server_state(self) -> dict[str, torch.Tensor]:
        return {**clone_state(self.global_state), **self.history.tensors()}

    def load_server_state(self, tensors: dict[str, torch.Tensor]) -> None:
        adapter, _ = split_merged(tensors)
        self.global_state = clone_state(adapter)
        self.history = MergeHistory.from_tensors(tensors)

    def round_metrics(self) -> dict[str, float]:
        """The merged offset's size: increments kept in factored form and the round of the last fold."""
        return {
            "merged_increments": float(len(self.history.increments)),
            "merged_snapshot_round": float(self.history.snapshot_round),
        }

    def report(self) -> list[str]:
        return [
            f"{self.name}: global/ is a merged model folder (base weights + merged updates + the adapter); "
            "load it with AutoModelForCausalLM.from_pretrained, not as a PEFT adapter"
        ]
