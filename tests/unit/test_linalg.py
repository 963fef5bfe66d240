"""fedlora.linalg: the factored SVD against numpy's dense SVD on random inputs."""

import numpy as np
import pytest
import torch

from conftest import assert_rel_close
from fedlora.linalg import dense_svd, lowrank_svd, orthonormal_completion, product_frobenius_norm


def random_factors(seed: int, d: int, k: int, ranks: list[int], dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d, r, generator=gen, dtype=dtype) for r in ranks]
    As = [torch.randn(r, k, generator=gen, dtype=dtype) for r in ranks]
    weights = torch.rand(len(ranks), generator=gen, dtype=torch.float64).tolist()
    return Bs, As, weights


@pytest.mark.parametrize("d,k,ranks", [(40, 30, [2, 3, 5]), (20, 50, [4, 8, 16]), (12, 10, [6, 9])])
def test_lowrank_svd_matches_numpy_dense_svd(d: int, k: int, ranks: list[int]) -> None:
    Bs, As, w = random_factors(0, d, k, ranks)
    M = sum(wi * (B.numpy() @ A.numpy()) for wi, B, A in zip(w, Bs, As))
    U, S, Vh = lowrank_svd(Bs, As, w)
    R = min(d, k, sum(ranks))
    assert U.shape == (d, R) and S.shape == (R,) and Vh.shape == (R, k)
    _, S_np, _ = np.linalg.svd(M, full_matrices=False)
    np.testing.assert_allclose(S.numpy(), S_np[:R], rtol=1e-10, atol=1e-10)
    assert torch.all(S[:-1] >= S[1:])  # descending
    np.testing.assert_allclose((U * S @ Vh).numpy(), M, atol=1e-10)
    torch.testing.assert_close(U.T @ U, torch.eye(R, dtype=torch.float64), atol=1e-10, rtol=0)
    for r in (1, 3, min(R, 7)):  # every rank-r truncation is numpy's best rank-r approximation
        U_np, S_np, Vh_np = np.linalg.svd(M, full_matrices=False)
        best = (U_np[:, :r] * S_np[:r]) @ Vh_np[:r]
        np.testing.assert_allclose((U[:, :r] * S[:r] @ Vh[:r]).numpy(), best, atol=1e-9)


def test_lowrank_svd_float32_keeps_dtype_and_agrees() -> None:
    Bs, As, w = random_factors(1, 64, 48, [4, 8, 12], dtype=torch.float32)
    U, S, Vh = lowrank_svd(Bs, As, w)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    # the float64 truth: the same factors in float64, dense SVD
    Ud, Sd, Vhd = dense_svd([B.double() for B in Bs], [A.double() for A in As], w)
    assert_rel_close(S, Sd[: S.shape[0]], 1e-5)
    # A rank-r truncation is only as well determined as the gap after it (Wedin: a perturbation of relative
    # size eps moves it by about eps * s_1 / (s_r - s_{r+1})), so truncate at the truth's largest gap and allow
    # 10 float32 epsilons times that factor (rank 6, a gap of 0.44 against s_1 = 58, failed 1e-5 on one machine).
    gaps = Sd[: S.shape[0] - 1] - Sd[1 : S.shape[0]]
    r = int(torch.argmax(gaps)) + 1
    rtol = 10 * torch.finfo(torch.float32).eps * float(Sd[0] / gaps[r - 1])
    assert rtol < 1e-5  # here r = 2 and s_1 / gap = 7.1: tighter than a fixed 1e-5
    truth = Ud[:, :r] * Sd[:r] @ Vhd[:r]
    assert_rel_close(U[:, :r] * S[:r] @ Vh[:r], truth, rtol)
    # the dense float32 path is accurate too: both agree with the truth, not element by element
    U32, S32, Vh32 = dense_svd(Bs, As, w)
    assert U32.dtype == torch.float32
    assert_rel_close(U32[:, :r] * S32[:r] @ Vh32[:r], truth, rtol)


def test_lowrank_svd_rejects_bad_inputs() -> None:
    Bs, As, w = random_factors(2, 10, 8, [2, 3])
    with pytest.raises(ValueError, match="do not make a 10 x 8 product"):
        lowrank_svd([Bs[0], Bs[1][:, :2]], As, w)
    with pytest.raises(ValueError, match="as many"):
        lowrank_svd(Bs, As, w[:1])
    with pytest.raises(TypeError, match="float32 or float64"):
        lowrank_svd([B.half() for B in Bs], [A.half() for A in As], w)


def test_product_norm_and_orthonormal_completion() -> None:
    Bs, As, _ = random_factors(3, 30, 20, [5])
    dense = torch.linalg.matrix_norm(Bs[0] @ As[0])
    torch.testing.assert_close(product_frobenius_norm(Bs[0], As[0]), dense, rtol=1e-12, atol=1e-12)
    rows = torch.linalg.qr(torch.randn(20, 4, dtype=torch.float64))[0].T  # 4 orthonormal rows
    extra = orthonormal_completion(rows, 6, seed=5)
    both = torch.cat([rows, extra])
    torch.testing.assert_close(both @ both.T, torch.eye(10, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(extra, orthonormal_completion(rows, 6, seed=5))
