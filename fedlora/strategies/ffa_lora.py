"""FFA-LoRA (Sun et al., 2024): freeze the random A, train and send only B.

A is PEFT's seeded initialisation (``adapter.init_seed``), identical on every client and never trained or
sent; B starts at zero. Clients upload B (and any trainable task head); the server averages them:

    B = sum_i p_i B_i,    p_i = n_i / sum_j n_j

which is exact for the product, since A is shared: sum_i p_i (alpha / r) B_i A = (alpha / r) (sum_i p_i B_i) A.
(FedIT's mean(B) mean(A) != mean(B A) bias cannot arise.) Payloads hold B only, so bytes up and down are
those of B: half of FedIT's on square modules (d = k), less where d < k (e.g. grouped-query k/v projections).
The evaluated and exported adapter is the frozen A with the global B. Needs one rank for every client.
"""

from __future__ import annotations

import torch

from fedlora.adapters.ranks import lora_key_parts
from fedlora.adapters.state import AdapterState, clone_state, state_digest
from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks
from fedlora.strategies.base import ServerSetup, StrategyOptions
from fedlora.strategies.fedavg import FactorAverage
from fedlora.strategies.registry import register_strategy


def is_lora_a(key: str) -> bool:
    parts = lora_key_parts(key)
    return parts is not None and parts[1] == "A"


@register_client_hooks
class FrozenA(ClientHooks):
    """FFA-LoRA's client side: A is neither trained nor sent (payloads hold B and heads); before training the
    client checks its own seeded A against the server's digest and refuses on a mismatch."""

    kind = "ffa-lora"
    partial_payload = True
    batchable = True
    a_digest: str

    def frozen(self, key: str) -> bool:
        return is_lora_a(key)

    def before_training(self, ctx: ClientContext) -> dict[str, float]:
        own_a = {k: v for k, v in ctx.adapters.state().items() if is_lora_a(k)}
        if state_digest(own_a) != self.a_digest:
            raise ValueError(
                "this client's frozen LoRA A differs from the server's (digest mismatch): the client must "
                "build its adapter with the run's adapter.init_seed, model and target modules"
            )
        return {}


@register_strategy
class FFALoRA(FactorAverage[StrategyOptions]):
    """FFA-LoRA: B-only payloads, exact averaging, A frozen at its seeded initialisation."""

    name = "ffa-lora"
    default_optimizer = "adamw"

    def initialize(self, setup: ServerSetup) -> None:
        super().initialize(setup)  # refuses heterogeneous ranks
        self.frozen_a: AdapterState = {k: v for k, v in self.global_state.items() if is_lora_a(k)}
        self._order = list(self.global_state)
        self.global_state = {k: v for k, v in self.global_state.items() if not is_lora_a(k)}

    def client_hooks(self) -> list[ClientHooks]:
        """B for every client, with the digest of the frozen A: a client whose own seeded A differs (another
        init seed, PEFT version or model) refuses to train instead of silently breaking exactness."""
        digest = state_digest(self.frozen_a) if hasattr(self, "frozen_a") else ""
        return [FrozenA(a_digest=digest)]

    def evaluation_state(self) -> AdapterState:
        """The full adapter: frozen A and global B, in PEFT's key order."""
        merged = {**self.frozen_a, **self.global_state}
        return {k: merged[k] for k in self._order}

    def server_state(self) -> dict[str, torch.Tensor]:
        return clone_state(self.evaluation_state())

    def load_server_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.frozen_a = {k: v.clone() for k, v in tensors.items() if is_lora_a(k)}
        self._order = list(tensors)
        self.global_state = {k: v.clone() for k, v in tensors.items() if not is_lora_a(k)}
