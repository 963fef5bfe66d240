"""FedKSeed (Qin et al., ICML 2024): zeroth-order federated tuning with a finite pool of K shared seeds.

Every perturbation of every client is drawn from one pool of K seeds s_1..s_K, fixed for the run. A MeZO step
(:mod:`fedlora.client.zeroth_order`) with seed s_k and projected gradient g moves the adapter by
-(lr / n) g z(s_k) (n perturbations per step, no weight decay), so after any number of steps by any clients

    theta = theta_0 - sum_k c_k z(s_k)          (theta_0: the seeded initial adapter, known to everyone)

and the whole global state is the K coefficients c. Clients upload their steps' (seed, g, lr) records; the
server adds each client's steps with its example weight p_i = n_i / sum_j n_j:

    c_k += sum_i p_i sum_{(t, j): s_tj = s_k} lr_t g_tj / n

which is the example-weighted average of the clients' updates (linear in the steps). What travels: K float64
coefficients down (32 KB at K = 4,096, whatever the model) and a few bytes per step up. A client rebuilds
theta from theta_0 and c before its steps (K regenerations of z; the cost does not grow with the rounds). The
global adapter for evaluation and export is materialised on the server the same way.

Differences from the paper's code: fedlora tunes the LoRA adapter (the paper tunes all weights; the rule is the
same), picks each perturbation's seed uniformly from the pool with a hash of (round seed, step, j) (the paper
also proposes non-uniform seed probabilities, not implemented), and a client rebuilds from the coefficients
each round instead of keeping its model between rounds.
"""

from __future__ import annotations

import functools
import hashlib
from typing import ClassVar, Literal

import torch
from pydantic import Field

from fedlora.adapters.state import AdapterState, state_digest
from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks
from fedlora.client.zeroth_order import (
    GRADS_KEY,
    LRS_KEY,
    SEEDS_KEY,
    WEIGHT_DECAY_KEY,
    ZerothOrder,
    check_steps_record,
    perturb,
)
from fedlora.errors import ConfigError
from fedlora.strategies.base import (
    GLOBAL,
    ClientInstruction,
    ClientReply,
    ExperimentFacts,
    ServerSetup,
    ServerState,
    Strategy,
    StrategyOptions,
    check_example_count,
    example_weights,
)
from fedlora.strategies.registry import register_strategy

COEFFICIENTS_KEY = "fedkseed.coefficients"
#: the state's group of theta_0, the seeded initial adapter every step record is replayed from
START = "start"


@functools.lru_cache(maxsize=8)
def seed_pool(pool_seed: int, size: int) -> tuple[int, ...]:
    """K 63-bit seeds from the run's pool seed (the same on every client and the server)."""
    return tuple(
        int.from_bytes(hashlib.sha256(f"{pool_seed}/fedkseed/{k}".encode()).digest()[:8], "little") >> 1
        for k in range(size)
    )


@functools.lru_cache(maxsize=8)
def seed_index(pool_seed: int, size: int) -> dict[int, int]:
    """Each pool seed's position k in :func:`seed_pool` (built once per pool, not per reply or round)."""
    return {s: k for k, s in enumerate(seed_pool(pool_seed, size))}


def materialise(start: AdapterState, pool: tuple[int, ...], coefficients: torch.Tensor) -> AdapterState:
    """theta_0 - sum_k c_k z(s_k), z drawn exactly as the zeroth-order steps draw it (tensors by name)."""
    state = {k: v.clone() for k, v in start.items()}
    tensors = [state[k] for k in sorted(state)]
    for k in torch.nonzero(coefficients).flatten().tolist():
        perturb(tensors, pool[k], -float(coefficients[k]))
    return state


@register_client_hooks
class SeedPoolSteps(ZerothOrder):
    """FedKSeed's client side: MeZO steps whose seeds come from the pool; the payload is the coefficients."""

    kind = "fedkseed"
    upload: Literal["weights", "seeds"] = "seeds"
    pool_seed: int
    pool_size: int = Field(ge=1)
    init_digest: str

    def step_seeds(self, round_seed: int, step: int) -> list[int]:
        pool = self._pool()
        out = []
        for j in range(self.perturbations):
            digest = hashlib.sha256(f"{round_seed}/fedkseed/{step}/{j}".encode()).digest()
            out.append(pool[int.from_bytes(digest[:8], "little") % self.pool_size])
        return out

    def _pool(self) -> tuple[int, ...]:
        return seed_pool(self.pool_seed, self.pool_size)

    def start_state(self, ctx: ClientContext, payload: AdapterState) -> AdapterState:
        start = ctx.adapters.initial_state()
        if state_digest(start) != self.init_digest:
            raise ValueError(
                "this client's seeded initial adapter differs from the server's (digest mismatch): it must "
                "build its adapter with the run's adapter.init_seed, model and target modules"
            )
        return materialise(start, self._pool(), payload[COEFFICIENTS_KEY])


class FedKSeedOptions(StrategyOptions):
    pool_size: int = Field(4096, ge=1, le=1_000_000, description="K, the number of shared seeds")
    eps: float = Field(1e-3, gt=0.0, description="perturbation scale of the two-point estimate")
    perturbations: int = Field(1, ge=1, description="perturbations per step")
    skip_nan_steps: bool = Field(
        True,
        description="a step whose loss is not finite moves nothing (FederatedScope's MeZOTrainer skips the batch)",
    )


@register_strategy
class FedKSeed(Strategy[FedKSeedOptions]):
    """FedKSeed: zeroth-order steps from K shared seeds; the global state is K coefficients."""

    name = "fedkseed"
    default_optimizer = "sgd"  # unused: zeroth-order steps (the learning rate is client.lr)
    Options: ClassVar[type[StrategyOptions]] = FedKSeedOptions

    @classmethod
    def refusal(cls, facts: ExperimentFacts, options: FedKSeedOptions) -> str | None:
        if facts.weight_decay:
            return (
                "config field 'client.weight_decay': fedkseed keeps the model as theta_0 - sum_k c_k z_k, which "
                "needs client.weight_decay: 0"
            )
        return super().refusal(facts, options)

    def __init__(self, options: FedKSeedOptions | None = None) -> None:
        super().__init__(options)
        self._materialised: tuple[torch.Tensor, AdapterState] | None = None  # (coefficients, model): a cache

    def initialize(self, setup: ServerSetup) -> ServerState:
        """The state: K coefficients (``global``, what travels) and theta_0 (group ``start``)."""
        profiles = sorted({p.name for p in setup.client_profiles.values()})
        if len(profiles) > 1:
            raise ConfigError(
                f"strategy fedkseed needs one rank for every client, resources give {', '.join(profiles)}"
            )
        state = super().initialize(setup)
        coefficients = torch.zeros(self.options.pool_size, dtype=torch.float64)
        return state.evolve({GLOBAL: {COEFFICIENTS_KEY: coefficients}, START: state.adapter})

    def pool(self) -> tuple[int, ...]:
        return seed_pool(self.setup.seed, self.options.pool_size)

    def client_hooks(self, state: ServerState) -> list[ClientHooks]:
        o = self.options
        return [
            SeedPoolSteps(
                eps=o.eps,
                perturbations=o.perturbations,
                skip_nonfinite=o.skip_nan_steps,
                pool_seed=self.setup.seed,
                pool_size=o.pool_size,
                init_digest=state_digest(state.group(START)),
            )
        ]

    def check(self, state: ServerState, instruction: ClientInstruction, reply: ClientReply) -> str | None:
        record = reply.payload
        n = self.options.perturbations
        reason = check_example_count(self.setup, reply) or check_steps_record(record, n)
        if reason is not None:
            return reason
        seeds = record[SEEDS_KEY]
        if float(record[WEIGHT_DECAY_KEY]) != 0.0:
            return "weight decay in the steps record (fedkseed needs none)"
        pool = seed_index(self.setup.seed, self.options.pool_size)
        if any(int(s) not in pool for s in seeds.flatten().tolist()):
            return "a seed outside the run's pool"
        return None

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        """c_k += sum_i p_i sum_{steps with seed s_k} lr g / n (module docstring)."""
        index = seed_index(self.setup.seed, self.options.pool_size)
        coefficients = state.adapter[COEFFICIENTS_KEY].clone()
        for p_i, reply in zip(example_weights(replies), replies, strict=True):
            seeds, grads, lrs = reply.payload[SEEDS_KEY], reply.payload[GRADS_KEY], reply.payload[LRS_KEY]
            n = seeds.shape[1]
            for step_seeds, step_grads, lr in zip(seeds.tolist(), grads.tolist(), lrs.tolist(), strict=True):
                for seed, g in zip(step_seeds, step_grads, strict=True):
                    coefficients[index[seed]] += p_i * lr * g / n
        return state.evolve({GLOBAL: {COEFFICIENTS_KEY: coefficients}})

    def evaluation_state(self, state: ServerState) -> AdapterState:
        """theta_0 - sum_k c_k z(s_k) (materialised once for each set of coefficients)."""
        coefficients = state.adapter[COEFFICIENTS_KEY]
        cached = self._materialised
        if cached is None or not torch.equal(cached[0], coefficients):
            cached = (coefficients.clone(), materialise(state.group(START), self.pool(), coefficients))
            self._materialised = cached
        return cached[1]

    def round_metrics(self, state: ServerState) -> dict[str, float]:
        return {"fedkseed_seeds_used": float(torch.count_nonzero(state.adapter[COEFFICIENTS_KEY]))}
