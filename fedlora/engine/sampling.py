"""Who takes part: the clients of a round (seeded by run seed, round and attempt) and the clients
an evaluation runs on."""

from __future__ import annotations

import math
import random

from fedlora.config.schema import EvalConfig, FederationConfig
from fedlora.data.examples import ClientData, Federation


def sample_clients(
    num_clients: int, per_round: int, seed: int, server_round: int, attempt: int = 0
) -> list[int]:
    """``per_round`` distinct client ids, sorted; depends only on (seed, round, attempt)."""
    rng = random.Random(f"{seed}/sample/{server_round}" + (f"/retry{attempt}" if attempt else ""))
    return sorted(rng.sample(range(num_clients), per_round))


def clients_per_round(fed: FederationConfig, num_clients: int) -> int:
    """``federation.clients_per_round``, or ceil(fraction x N), or all N clients."""
    if fed.clients_per_round is not None:
        if fed.clients_per_round > num_clients:
            raise ValueError(
                f"federation.clients_per_round ({fed.clients_per_round}) is above the {num_clients} clients the data yields"
            )
        return fed.clients_per_round
    if fed.fraction is not None:
        return max(1, math.ceil(fed.fraction * num_clients))
    return num_clients


def evaluation_clients(
    cfg: EvalConfig, seed: int, federation: Federation, final: bool = False
) -> list[ClientData]:
    """The held-out clients if there are any (zero-shot protocol), else the training clients; then a fixed
    seeded sample of ``eval.max_clients`` (``eval.final_max_clients`` after the last round) of those that
    have the eval split (all if unset)."""
    pool = federation.held_out or federation.clients
    having = [c for c in pool if c.size(cfg.split) > 0]
    limit = cfg.final_max_clients if final else cfg.max_clients
    if limit is None or limit >= len(having):
        return having
    rng = random.Random(f"{seed}/eval")
    return sorted(rng.sample(having, limit), key=lambda c: c.client_id)
