"""Updates merged into the frozen base weights (FLoRA, FedEx-LoRA): their format on the wire, the server's
history of them, and how a node rebuilds the merged base.

A method that merges sends, next to the adapter, the base offset D of every target module in factored form,

    W = W0 + D,      D = D_snap + sum_{t in increments} P_t Q_t      (P_t: d x R_t, Q_t: R_t x k)

where the scale (alpha / r) and the clients' weights p_i are folded into P_t. Keys (all under ``merged.``):

- ``merged.rounds``: int64 vector, the rounds of the increments present, in order;
- ``merged.snapshot_round``: int64 scalar, the last round folded into the snapshot (0: no snapshot);
- ``merged.snapshot.<module>``: D_snap (d x k float32), present when ``snapshot_round > 0``;
- ``merged.<t>.<module>.P`` / ``.Q``: the increment of round t.

Every payload carries the whole offset (a client never sampled before, or a fresh worker, rebuilds it from
the payload alone); when the increments' bytes would pass those of the dense offset, the server folds them
into the snapshot (:class:`MergeHistory`), so a payload never exceeds about twice the dense size. A node
applies an offset deterministically: W = ((W0 + D_snap) + P_1 Q_1) + P_2 Q_2 ..., applying only the
increments it has not applied yet when the rest matches (:class:`MergedBase`), so a resumed run, a worker and
the server's evaluation all hold the same weights bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedlora.adapters.state import AdapterState

PREFIX = "merged."
ROUNDS = PREFIX + "rounds"
SNAPSHOT_ROUND = PREFIX + "snapshot_round"

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def split_merged(state: AdapterState) -> tuple[AdapterState, AdapterState]:
    """``(adapter part, merged part)`` of a state."""
    merged = {k: v for k, v in state.items() if k.startswith(PREFIX)}
    if not merged:
        return state, {}
    return {k: v for k, v in state.items() if not k.startswith(PREFIX)}, merged


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class MergeHistory:
    """The server's merged offset: a dense snapshot (float64) and the increments since, as they travel."""

    snapshot: dict[str, torch.Tensor] = field(default_factory=dict)
    snapshot_round: int = 0
    increments: list[tuple[int, Factors]] = field(default_factory=list)

    def add(self, server_round: int, factors: Factors) -> None:
        """Record round ``server_round``'s increment {module: (P, Q)} (float32 on the CPU, what travels);
        fold everything into the snapshot when the increments outweigh the dense offset."""
        factors = {
            m: (P.to("cpu", torch.float32), Q.to("cpu", torch.float32)) for m, (P, Q) in factors.items()
        }
        self.increments.append((server_round, factors))
        dense = sum(P.shape[0] * Q.shape[1] * 4 for P, Q in factors.values())
        stacked = sum((P.numel() + Q.numel()) * 4 for _, inc in self.increments for P, Q in inc.values())
        if stacked > dense:
            for _, inc in self.increments:
                for module, (P, Q) in inc.items():
                    term = P.to(torch.float64) @ Q.to(torch.float64)
                    self.snapshot[module] = self.snapshot[module] + term if module in self.snapshot else term
            self.snapshot_round = self.increments[-1][0]
            self.increments = []

    def tensors(self) -> AdapterState:
        """The offset as it travels (and as a checkpoint keeps it: the snapshot in float64)."""
        out: AdapterState = {
            ROUNDS: torch.tensor([t for t, _ in self.increments], dtype=torch.int64),
            SNAPSHOT_ROUND: torch.tensor(self.snapshot_round, dtype=torch.int64),
        }
        for module, D in self.snapshot.items():
            out[f"{PREFIX}snapshot.{module}"] = D
        for t, inc in self.increments:
            for module, (P, Q) in inc.items():
                out[f"{PREFIX}{t}.{module}.P"], out[f"{PREFIX}{t}.{module}.Q"] = P, Q
        return out

    def payload(self) -> AdapterState:
        """:meth:`tensors` with the snapshot in float32 (what a client needs)."""
        return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in self.tensors().items()}

    @classmethod
    def from_tensors(cls, tensors: AdapterState) -> MergeHistory:
        history = cls()
        _, merged = split_merged(tensors)
        if not merged:
            return history
        history.snapshot_round = int(merged[SNAPSHOT_ROUND])
        snap = PREFIX + "snapshot."
        history.snapshot = {
            k[len(snap) :]: v.to(torch.float64) for k, v in merged.items() if k.startswith(snap)
        }
        history.increments = [(t, increment(merged, t)) for t in merged[ROUNDS].tolist()]
        return history


def increment(merged: AdapterState, server_round: int) -> Factors:
    """Round ``server_round``'s {module: (P, Q)} from a merged state."""
    head = f"{PREFIX}{server_round}."
    modules = sorted(k[len(head) : -2] for k in merged if k.startswith(head) and k.endswith(".P"))
    return {m: (merged[f"{head}{m}.P"], merged[f"{head}{m}.Q"]) for m in modules}


class MergedBase:
    """A node's view of the base weights a merging method has changed: W0 kept aside, the offset applied.

    ``apply(weights, merged)`` sets each target weight to W0 + D for the offset in ``merged`` ({} = back to
    W0), computing only the increments not yet applied when the snapshot and the earlier increments are the
    ones already in place.
    """

    def __init__(self) -> None:
        self.original: dict[str, torch.Tensor] = {}
        self.snapshot_round = 0
        self.applied: list[int] = []

    def apply(self, weights: dict[str, torch.Tensor], merged: AdapterState) -> None:
        """``weights``: module path -> its live base weight (d x k); ``merged``: a merged state or {}."""
        if not merged and not self.original:
            return
        snapshot_round = int(merged[SNAPSHOT_ROUND]) if merged else 0
        rounds = merged[ROUNDS].tolist() if merged else []
        with torch.no_grad():
            for module, weight in weights.items():
                if module not in self.original:
                    if not weight.dtype.is_floating_point:
                        raise ValueError(
                            f"model.quantization: this strategy merges updates into the base weights, but "
                            f"{module} is quantized; set model.quantization: null for it"
                        )
                    self.original[module] = weight.detach().clone()
            in_place = snapshot_round == self.snapshot_round and rounds[: len(self.applied)] == self.applied
            if not in_place:
                for module, weight in weights.items():
                    weight.copy_(self.original[module])
                    D = merged.get(f"{PREFIX}snapshot.{module}")
                    if D is not None:
                        weight.add_(D.to(weight.device, weight.dtype))
                self.snapshot_round, self.applied = snapshot_round, []
            for t in rounds[len(self.applied) :]:
                for module, (P, Q) in increment(merged, t).items():
                    weight = weights[module]
                    weight.add_(P.to(weight.device, weight.dtype) @ Q.to(weight.device, weight.dtype))
                self.applied.append(t)
