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

from fedlora.adapters.ranks import lora_key_parts
from fedlora.adapters.state import AdapterState, state_digest
from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks
from fedlora.strategies.base import GLOBAL, ServerSetup, ServerState, StrategyOptions
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


#: the state's group of the frozen A factors (never sent; the evaluated adapter's A)
FROZEN_A = "frozen_a"


@register_strategy
class FFALoRA(FactorAverage[StrategyOptions]):
    """FFA-LoRA: B-only payloads, exact averaging, A frozen at its seeded initialisation."""

    name = "ffa-lora"
    default_optimizer = "adamw"

    def initialize(self, setup: ServerSetup) -> ServerState:
        state = super().initialize(setup)  # refuses heterogeneous ranks
        full = state.adapter
        return state.evolve(
            {
                GLOBAL: {k: v for k, v in full.items() if not is_lora_a(k)},
                FROZEN_A: {k: v for k, v in full.items() if is_lora_a(k)},
            },
            {"key_order": list(full)},
        )

    def client_hooks(self, state: ServerState) -> list[ClientHooks]:
        """B for every client, with the digest of the frozen A: a client whose own seeded A differs (another
        init seed, PEFT version or model) refuses to train instead of silently breaking exactness."""
        return [FrozenA(a_digest=state_digest(state.group(FROZEN_A)))]

    def evaluation_state(self, state: ServerState) -> AdapterState:
        """The full adapter: frozen A and global B, in PEFT's key order."""
        merged = {**state.group(FROZEN_A), **state.adapter}
        return {k: merged[k] for k in state.facts["key_order"]}
