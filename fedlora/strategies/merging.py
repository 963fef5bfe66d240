"""What FLoRA and FedEx-LoRA share: each round part of the aggregate is merged into the frozen base weights.

The server keeps the merged offset as a :class:`~fedlora.adapters.merged.MergeHistory` (a dense snapshot and
the factored increments since) and sends it with every payload, so any client rebuilds W0 + D exactly; the
clients train an ordinary LoRA on top and send only the adapter. Evaluation and export see the same merged
base: ``global/`` is a whole merged model folder (W0 + D + s B A), loadable with plain transformers, not a
PEFT adapter (a merged base cannot be expressed as a rank-r adapter). Causal-LM only, full-precision base
only (a quantized weight cannot take an exact offset).
"""

from __future__ import annotations

from fedlora.adapters.merged import Factors, MergeHistory
from fedlora.adapters.state import AdapterState
from fedlora.strategies.base import (
    GLOBAL,
    ClientInstruction,
    ExperimentFacts,
    OptionsT,
    ServerState,
    Strategy,
)

#: the state's group of the merged offset (:meth:`MergeHistory.tensors`: the snapshot in float64, increments)
MERGED = "merged"


def merge_history(state: ServerState) -> MergeHistory:
    """The merged offset the state holds."""
    return MergeHistory.from_tensors(state.group(MERGED))


class MergingStrategy(Strategy[OptionsT]):
    """Base of methods that merge into the base weights: the offset (group ``merged``) travels with every
    payload and is checkpointed with the adapter; replies are checked against the adapter part of the payload."""

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

    def client_payload(self, state: ServerState, server_round: int, client_id: int) -> AdapterState:
        """The adapter client ``client_id`` starts from (default: the global adapter)."""
        return state.adapter

    def configure_round(
        self, state: ServerState, server_round: int, client_ids: list[int]
    ) -> dict[int, ClientInstruction]:
        hooks = self.client_hooks(state)
        merged = merge_history(state).payload()
        return {
            cid: ClientInstruction({**self.client_payload(state, server_round, cid), **merged}, hooks=hooks)
            for cid in client_ids
        }

    def merge(
        self, state: ServerState, server_round: int, increment: Factors, adapter: AdapterState
    ) -> ServerState:
        """The next state: round ``server_round``'s increment {module: (P, Q)} added to the merged offset, and
        ``adapter`` as the global adapter."""
        history = merge_history(state)
        history.add(server_round, increment)
        return state.evolve({GLOBAL: adapter, MERGED: history.tensors()})

    def evaluation_state(self, state: ServerState) -> AdapterState:
        return {**state.adapter, **merge_history(state).payload()}

    def round_metrics(self, state: ServerState) -> dict[str, float]:
        """The merged offset's size: increments kept in factored form and the round of the last fold."""
        history = merge_history(state)
        return {
            "merged_increments": float(len(history.increments)),
            "merged_snapshot_round": float(history.snapshot_round),
        }

    def report(self, state: ServerState) -> list[str]:
        return [
            f"{self.name}: global/ is a merged model folder (base weights + merged updates + the adapter); "
            "load it with AutoModelForCausalLM.from_pretrained, not as a PEFT adapter"
        ]
