"""Update-norm screening and clipping as a strategy wrapper (any strategy, any engine).

For a reply that is an update of what the client was sent (same tensor names and shapes), its norm is
||reply - sent|| over all tensors as one vector. ``federation.max_update_norm`` rejects norms above it;
``max_update_norm_ratio`` rejects norms above that multiple of the round's median (with at least 3 such
replies); ``clip_update_norm`` scales the accepted updates down to that norm before aggregation.
"""

from __future__ import annotations

from fedlora.adapters.state import AdapterState
from fedlora.config.schema import FederationConfig
from fedlora.strategies.base import ClientInstruction, ClientReply, Strategy
from fedlora.strategies.wrappers import StrategyWrapper


def same_shapes(sent: AdapterState, got: AdapterState) -> bool:
    """Whether ``got`` is an update of ``sent`` (same tensor names and shapes); seed records and pruned
    replies are not."""
    return sent.keys() == got.keys() and all(got[k].shape == v.shape for k, v in sent.items())


def update_norm(sent: AdapterState, got: AdapterState) -> float:
    """||got - sent|| over all tensors as one vector (float64)."""
    return float(sum(float((got[k].double() - sent[k].double()).pow(2).sum()) for k in sent) ** 0.5)


def clip_update(sent: AdapterState, got: AdapterState, factor: float) -> AdapterState:
    """sent + factor * (got - sent), tensor by tensor."""
    return {
        k: (sent[k].double() + factor * (got[k].double() - sent[k].double())).to(got[k].dtype) for k in got
    }


class UpdateNormScreen(StrategyWrapper):
    """Rejects updates by absolute norm and by ratio to the round's median; clips the accepted ones."""

    _own = frozenset({"inner", "limits", "_sent"})

    def __init__(self, inner: Strategy, limits: FederationConfig) -> None:
        super().__init__(inner)
        self.limits = limits
        self._sent: dict[int, tuple[AdapterState, float]] = {}  # client -> (what it was sent, update norm)

    def configure(self, server_round: int, client_ids: list[int]) -> dict[int, ClientInstruction]:
        self._sent = {}
        return self.inner.configure(server_round, client_ids)

    def validate_reply(self, instruction: ClientInstruction, reply: ClientReply) -> str | None:
        reason = self.inner.validate_reply(instruction, reply)
        if reason is None and same_shapes(instruction.payload, reply.payload):
            norm = update_norm(instruction.payload, reply.payload)
            limit = self.limits.max_update_norm
            if limit is not None and norm > limit:
                return f"update norm {norm:.3g} above federation.max_update_norm ({limit})"
            self._sent[reply.client_id] = (instruction.payload, norm)
        return reason

    def screen(self, replies: list[ClientReply]) -> tuple[list[ClientReply], list[tuple[int, str]]]:
        replies, rejected = self.inner.screen(replies)
        ratio, clip = self.limits.max_update_norm_ratio, self.limits.clip_update_norm
        norms = sorted(self._sent[r.client_id][1] for r in replies if r.client_id in self._sent)
        median = norms[len(norms) // 2] if norms else 0.0
        kept = []
        for reply in replies:
            sent, norm = self._sent.get(reply.client_id, (None, None))
            if norm is not None and ratio and len(norms) >= 3 and median > 0 and norm > ratio * median:
                rejected.append(
                    (
                        reply.client_id,
                        f"update norm {norm:.3g} is {norm / median:.3g}x the round's median "
                        f"(above federation.max_update_norm_ratio {ratio})",
                    )
                )
                continue
            if sent is not None and norm is not None and clip is not None and norm > clip:
                reply.payload = clip_update(sent, reply.payload, clip / norm)
            kept.append(reply)
        return kept, rejected
