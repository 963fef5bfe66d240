"""Rank profiles: which LoRA rank a client can afford, on attention and on MLP modules.

A :class:`RankProfile` fixes the rank per module kind. A module is *attention* when a component of its
path contains ``attn`` or ``attention`` (LLaMA ``self_attn.q_proj``, BERT ``attention.self.query`` and
``attention.output.dense``), otherwise *mlp* (``mlp.gate_proj``, BERT ``intermediate.dense``, ``output.dense``).

Scaling convention, the same on the server and on every client whatever its rank (PEFT's): a module of
rank r computes ``W0 x + s_r B A x`` with one ``alpha`` for the whole federation and ``s_r = alpha / r``
(LoRA), or ``s_r = alpha / sqrt(r)`` with ``adapter.use_rslora`` (rank-stabilised LoRA, PEFT's
``use_rslora``): :class:`LoraScaling`. So a client's full-size update is ``Delta = s_r B A``, and moving
factors from rank r to rank r' while keeping ``Delta`` multiplies B by ``s_r / s_r'`` (:func:`rescale_b`).
Every rank change in fedlora (padding, truncation, SVD redistribution) goes through that rule, so a client's
effective update never depends on the rank it is expressed at.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters.state import AdapterState
from fedlora.config.schema import ResourcesConfig

ATTENTION = "attention"
MLP = "mlp"
_ATTENTION_PART = re.compile(r"attn|attention", re.IGNORECASE)


def module_kind(module_path: str) -> str:
    """``attention`` or ``mlp`` for a module path such as ``model.layers.0.self_attn.q_proj``."""
    return ATTENTION if any(_ATTENTION_PART.search(part) for part in module_path.split(".")) else MLP


@dataclass(frozen=True, order=True)
class RankProfile:
    """LoRA rank on attention modules and on MLP modules."""

    attention: int
    mlp: int

    @classmethod
    def uniform(cls, rank: int) -> RankProfile:
        return cls(rank, rank)

    def rank_for(self, module_path: str) -> int:
        return self.attention if module_kind(module_path) == ATTENTION else self.mlp

    @property
    def name(self) -> str:
        """``r8`` when both ranks agree, else ``a30-m200``."""
        return f"r{self.attention}" if self.attention == self.mlp else f"a{self.attention}-m{self.mlp}"

    def scaled(self, factor: float) -> RankProfile:
        return RankProfile(max(1, round(self.attention * factor)), max(1, round(self.mlp * factor)))

    def restricted_to(self, kinds: set[str]) -> RankProfile:
        """The same profile when only ``kinds`` are targeted (an untargeted kind copies the other's rank)."""
        if kinds == {ATTENTION}:
            return RankProfile.uniform(self.attention)
        if kinds == {MLP}:
            return RankProfile.uniform(self.mlp)
        return self

    def pruned(self, gamma: float) -> RankProfile:
        """HetLoRA's rank drop: each rank becomes max(1, floor(gamma * r))."""
        return RankProfile(max(1, int(gamma * self.attention)), max(1, int(gamma * self.mlp)))


# The four client types of the FlexLoRA paper (LLaMA-7B scale): r=8, r=30, 30 attention / 200 MLP, r=200.
PAPER_RANK_TYPES: tuple[RankProfile, ...] = (
    RankProfile(8, 8),
    RankProfile(30, 30),
    RankProfile(30, 200),
    RankProfile(200, 200),
)

# Client share of each paper type, in the order above, as FlexLoRA's released code draws them (main.py,
# get_peft: Type_0 r8, Type_1 r200, Type_2 a30-m200, Type_3 r30). ``normal`` there draws Type_i with
# probability proportional to a N(1.5, 0.7) pdf at i: 5.75% r8, 44.25% r200, 44.25% a30-m200, 5.75% r30. (Read as "5.75/44.25/44.25/5.75" over the types in
# increasing size, the paper's description would put 44.25% on r30 instead of r200; the code is what
# produced the paper's numbers, so fedlora follows the code.)
NAMED_DISTRIBUTIONS: dict[str, tuple[float, ...]] = {
    "uniform": (0.25, 0.25, 0.25, 0.25),
    "heavy-tail-light": (0.80, 0.05, 0.05, 0.10),
    "heavy-tail-strong": (0.05, 0.05, 0.10, 0.80),
    "normal": (0.0575, 0.0575, 0.4425, 0.4425),
}


def counts_from_shares(shares: list[float], num_clients: int) -> list[int]:
    """Integer client counts per type summing to ``num_clients`` (largest remainder on the shares)."""
    total = sum(shares)
    exact = [s / total * num_clients for s in shares]
    counts = [int(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (exact[i] - counts[i], -i), reverse=True)
    for i in order[: num_clients - sum(counts)]:
        counts[i] += 1
    return counts


def assign_profiles(
    num_clients: int, types: list[RankProfile], shares: list[float], seed: int
) -> list[RankProfile]:
    """One profile per client: type counts from the shares, dealt to clients in a seeded random order."""
    pool = [t for t, n in zip(types, counts_from_shares(shares, num_clients), strict=True) for _ in range(n)]
    random.Random(f"{seed}/ranks").shuffle(pool)
    return pool


def lora_key_parts(key: str) -> tuple[str, str] | None:
    """``(module path, "A" | "B")`` for a LoRA factor key, else None (e.g. a task head)."""
    for factor in ("A", "B"):
        marker = f".lora_{factor}."
        if marker in key:
            return key.split(marker, 1)[0], factor
    return None


def profile_of_state(state: AdapterState) -> RankProfile:
    """The rank profile of a state (each module kind must have one rank; an absent kind copies the other).

    Read from the A factors, or from the B factors (their columns) in a B-only state (FFA-LoRA payloads).
    """
    by_kind: dict[str, set[int]] = {}
    has_a = any(".lora_A." in key for key in state)
    for key, tensor in state.items():
        parts = lora_key_parts(key)
        if parts is None or parts[1] != ("A" if has_a else "B"):
            continue
        rank = int(tensor.shape[0] if has_a else tensor.shape[-1])
        by_kind.setdefault(module_kind(parts[0]), set()).add(rank)
    if not by_kind:
        raise ValueError("adapter state has no LoRA factors")
    for kind, ranks in by_kind.items():
        if len(ranks) != 1:
            raise ValueError(f"adapter state has several ranks on {kind} modules: {sorted(ranks)}")
    attention = next(iter(by_kind.get(ATTENTION, by_kind.get(MLP, set()))))
    mlp = next(iter(by_kind.get(MLP, {attention})))
    return RankProfile(attention, mlp)


@dataclass(frozen=True)
class LoraScaling:
    """The LoRA scaling s_r at rank r, one rule for the whole federation (server and every client).

    ``s_r = alpha / r`` (LoRA, PEFT's default), or ``s_r = alpha / sqrt(r)`` when ``rank_stabilized``
    (rsLoRA, Kalajdzievski 2023; PEFT's ``use_rslora``), which keeps the update's scale from shrinking as r
    grows: with one alpha, an r50 client's update under alpha / r is scaled 25x less than an r2 client's,
    under alpha / sqrt(r) 5x less.
    """

    alpha: float
    rank_stabilized: bool = False
    #: one constant s at every rank (``adapter.scale``: alpha = s r per module); None: the rules above
    constant: float | None = None

    def __call__(self, rank: int) -> float:
        if self.constant is not None:
            return self.constant
        return self.alpha / math.sqrt(rank) if self.rank_stabilized else self.alpha / rank

    def alpha_at(self, rank: int) -> float:
        """The PEFT ``lora_alpha`` that gives s_r at ``rank`` (alpha itself unless the scale is constant)."""
        return self.constant * rank if self.constant is not None else self.alpha


def rescale_b(B: torch.Tensor, scaling: LoraScaling, from_rank: int, to_rank: int) -> torch.Tensor:
    """B expressed at ``to_rank`` so that s_to * B' A = s_from * B A: B' = B * s_from / s_to."""
    return B * (scaling(from_rank) / scaling(to_rank))


def truncate_state(state: AdapterState, profile: RankProfile, scaling: LoraScaling) -> AdapterState:
    """Keep the first r rows of every A and the first r columns of every B (r from ``profile``), with B
    rescaled to the new rank (:func:`rescale_b`); other tensors (task heads) are copied."""
    out: AdapterState = {}
    for key, tensor in state.items():
        parts = lora_key_parts(key)
        if parts is None:
            out[key] = tensor.clone()
            continue
        module, factor = parts
        rank = profile.rank_for(module)
        if factor == "A":
            full = tensor.shape[0]
            if rank > full:
                raise ValueError(f"{key}: cannot truncate rank {full} to {rank}")
            out[key] = tensor[:rank].clone()
        else:
            full = tensor.shape[1]
            if rank > full:
                raise ValueError(f"{key}: cannot truncate rank {full} to {rank}")
            out[key] = rescale_b(tensor[:, :rank], scaling, full, rank).contiguous()
    return out


def module_factors(state: AdapterState) -> dict[str, tuple[str, str]]:
    """Module path -> (key of its A, key of its B)."""
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    for key in state:
        parts = lora_key_parts(key)
        if parts is not None:
            (a_keys if parts[1] == "A" else b_keys)[parts[0]] = key
    return {module: (a_keys[module], b_keys[module]) for module in a_keys if module in b_keys}


def client_profiles(
    resources: ResourcesConfig, adapter_rank: int, num_clients: int, seed: int
) -> list[RankProfile]:
    """Each client's rank profile from the config's ``resources`` section (see its docstring)."""
    if resources.distribution == "homogeneous":
        return [RankProfile.uniform(adapter_rank)] * num_clients
    types = [RankProfile(t.attention, t.mlp).scaled(resources.rank_scale) for t in resources.rank_types]
    shares = list(resources.shares or NAMED_DISTRIBUTIONS[resources.distribution])
    profiles = assign_profiles(num_clients, types, shares, seed)
    if resources.force is not None:
        used = sorted(set(profiles), key=lambda p: (p.attention + p.mlp, p.attention))
        forced = used[0] if resources.force == "min" else used[-1]
        profiles = [forced] * num_clients
    return profiles


def largest_profile(profiles: list[RankProfile]) -> RankProfile:
    """The per-kind maximum (r_max on attention, r_max on MLP): the server's global rank."""
    return RankProfile(max(p.attention for p in profiles), max(p.mlp for p in profiles))


def trailing_rank_norms(named: Sequence[tuple[str, torch.Tensor]], gamma: float) -> torch.Tensor:
    """HetLoRA's self-pruning measure per module: ||B[:, g:]||_F * ||A[g:, :]||_F with g = floor(gamma r).

    ``named``: (PEFT key, tensor) pairs of the trainable adapter; differentiable (the penalty uses it).
    """
    tensors = dict(named)
    norms = []
    for a_key, b_key in module_factors(tensors).values():
        A, B = tensors[a_key], tensors[b_key]
        g = int(gamma * A.shape[0])
        norms.append(B[:, g:].norm() * A[g:, :].norm())
    return torch.stack(norms) if norms else torch.zeros(0)
