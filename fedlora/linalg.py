"""Low-rank linear algebra for aggregating LoRA updates without ever forming a d x k matrix.

The sum of n low-rank products

    M = sum_i w_i B_i A_i,        B_i: d x r_i,  A_i: r_i x k

has rank at most R = sum_i r_i. Its SVD comes from the factors alone:

    B_cat = [w_1 B_1, ..., w_n B_n]   (d x R),      A_cat = [A_1; ...; A_n]   (R x k),   M = B_cat A_cat
    B_cat = Q_b R_b,   A_cat^T = Q_a R_a            (reduced QR)
    R_b R_a^T = u S v^T                              (SVD of a small core, at most R x R)
    M = (Q_b u) S (Q_a v)^T                          => U = Q_b u,  Vh = v^T Q_a^T

Cost O((d + k) R^2 + R^3) and memory O((d + k) R), instead of O(d k min(d, k)) time and O(d k) memory for
forming M and running a full SVD.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def tensor_sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """The terms added left to right, as Python's ``sum`` does (typed: a tensor, never the int 0)."""
    iterator = iter(terms)
    total = next(iterator)
    for term in iterator:
        total = total + term
    return total


def lowrank_svd(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, Vh)`` of ``sum_i weights[i] * Bs[i] @ As[i]``, computed from the factors.

    Shapes: ``Bs[i]``: d x r_i, ``As[i]``: r_i x k; returns ``U``: d x R', ``S``: R' (descending, >= 0),
    ``Vh``: R' x k with ``R' = min(d, k, sum r_i)``, so that ``U @ diag(S) @ Vh`` equals the sum. Computed in
    the dtype of the inputs (float32 or float64); every input must share it. Trailing singular values
    may be (numerically) zero when the sum has lower rank than R'.
    """
    if len(Bs) == 0 or len(Bs) != len(As) or len(Bs) != len(weights):
        raise ValueError(
            f"lowrank_svd needs as many B, A and weights, at least one (got {len(Bs)}, {len(As)}, {len(weights)})"
        )
    dtype = Bs[0].dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"lowrank_svd works in float32 or float64, got {dtype}")
    d, k = Bs[0].shape[0], As[0].shape[1]
    for i, (B, A) in enumerate(zip(Bs, As, strict=True)):
        if B.dtype != dtype or A.dtype != dtype:
            raise TypeError(f"factor {i}: dtypes {B.dtype}/{A.dtype}, expected {dtype} like factor 0")
        if B.ndim != 2 or A.ndim != 2 or B.shape[0] != d or A.shape[1] != k or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"factor {i}: B {tuple(B.shape)} and A {tuple(A.shape)} do not make a {d} x {k} product"
            )
    w = [float(x) for x in weights]
    B_cat = torch.cat([wi * B for wi, B in zip(w, Bs, strict=True)], dim=1)  # d x R
    A_cat = torch.cat(list(As), dim=0)  # R x k
    Q_b, R_b = torch.linalg.qr(B_cat)  # d x m_b, m_b x R
    Q_a, R_a = torch.linalg.qr(A_cat.T)  # k x m_a, m_a x R
    u, S, vh = torch.linalg.svd(R_b @ R_a.T, full_matrices=False)  # core: m_b x m_a
    return Q_b @ u, S, vh @ Q_a.T


def dense_svd(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The naive way, for tests and benchmarks: form the d x k sum, then a full SVD of it."""
    M = sum(float(w) * (B @ A) for w, B, A in zip(weights, Bs, As, strict=True))
    assert isinstance(M, torch.Tensor)
    return torch.linalg.svd(M, full_matrices=False)


def product_frobenius_norm(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """||B A||_F without the d x k product: sqrt(sum((B^T B) * (A A^T))) (B: d x r, A: r x k)."""
    gram = (B.T @ B) * (A @ A.T)
    return gram.sum().clamp_min(0).sqrt()


def orthonormal_completion(rows: torch.Tensor, extra: int, seed: int) -> torch.Tensor:
    """``extra`` unit rows orthogonal to each other and to the orthonormal rows of ``rows`` (m x k).

    Drawn from a seeded Gaussian and orthogonalised (QR), so the same inputs give the same rows.
    Needs m + extra <= k.
    """
    m, k = rows.shape
    if m + extra > k:
        raise ValueError(f"cannot complete {m} rows with {extra} more in {k} dimensions")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(extra, k, generator=generator, dtype=torch.float64).to(rows.dtype)
    if m:
        noise = noise - (noise @ rows.T) @ rows
    q, _ = torch.linalg.qr(noise.T)
    out = q.T[:extra]
    if m:  # one more pass for numerical orthogonality against ``rows``
        out = out - (out @ rows.T) @ rows
        q, _ = torch.linalg.qr(out.T)
        out = q.T[:extra]
    return out
