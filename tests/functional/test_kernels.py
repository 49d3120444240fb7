"""probes.kernels: centered alignment, linear CKA (feature space, P x P, debiased), minibatch CKA.

References are written independently here in numpy: the P x P centering by ``C K C`` with
``C = I - 11^T/P`` (Cortes et al. 2012), Song et al.'s unbiased HSIC with explicit ``K~``, and the
U-statistic over all ordered 4-tuples of distinct samples for tiny batches.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.kernels import (
    DegenerateKernelError,
    StreamingCKA,
    alignment,
    center,
    center_features,
    cka,
    hsic,
    linear_hsic,
    minibatch_cka,
)

SETTINGS = settings(max_examples=30, deadline=None)


# ---------------------------------------------------------------- independent numpy references
def ref_alignment(K: np.ndarray, L: np.ndarray) -> float:
    P = K.shape[0]
    C = np.eye(P) - np.ones((P, P)) / P
    Kc, Lc = C @ K @ C, C @ L @ C
    return float((Kc * Lc).sum() / (np.linalg.norm(Kc) * np.linalg.norm(Lc)))


def ref_hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. 2012, eq. (5), with explicit zero-diagonal matrices."""
    n = K.shape[0]
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    one = np.ones(n)
    return float(
        (
            np.trace(Kt @ Lt)
            + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * one @ Kt @ Lt @ one
        )
        / (n * (n - 3))
    )


def ref_hsic_ustat(K: np.ndarray, L: np.ndarray) -> float:
    """HSIC = E k_ij l_ij + E k_ij E l_qr - 2 E k_ij l_iq as a U-statistic over distinct (i, j, q, r)."""
    n = K.shape[0]
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2.0 * K[i, j] * L[i, q]
        count += 1
    return total / count


def ref_debiased_cka(X: np.ndarray, Y: np.ndarray) -> float:
    K, L = X @ X.T, Y @ Y.T
    return ref_hsic_unbiased(K, L) / np.sqrt(ref_hsic_unbiased(K, K) * ref_hsic_unbiased(L, L))


def rng_matrix(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def random_orthogonal(seed: int, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng_matrix(seed, d, d))
    return q * np.sign(np.diag(r))


dims = st.integers(min_value=1, max_value=40)
samples = st.integers(min_value=5, max_value=30)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


# ---------------------------------------------------------------- centering
def test_center_equals_ckc() -> None:
    K = rng_matrix(0, 7, 7)
    C = np.eye(7) - 1 / 7
    np.testing.assert_allclose(center(torch.tensor(K)).numpy(), C @ K @ C, atol=1e-12)
    F = rng_matrix(1, 7, 3)
    Fc = center_features(torch.tensor(F)).numpy()
    np.testing.assert_allclose(Fc @ Fc.T, C @ F @ F.T @ C, atol=1e-12)


# ---------------------------------------------------------------- feature space == P x P
@SETTINGS
@given(P=samples, d1=dims, d2=dims, seed=seeds)
def test_cka_feature_space_equals_pxp(P: int, d1: int, d2: int, seed: int) -> None:
    X, Y = rng_matrix(seed, P, d1) + 0.5, rng_matrix(seed + 1, P, d2) - 1.0
    Y[:, : min(d1, d2)] += X[:, : min(d1, d2)]  # some dependence
    expected = ref_alignment(X @ X.T, Y @ Y.T)
    Xt, Yt = torch.tensor(X), torch.tensor(Y)
    for method in ("auto", "features", "gram"):
        assert cka(Xt, Yt, method=method).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert alignment(Xt @ Xt.T, Yt @ Yt.T).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert linear_hsic(Xt, Yt).item() == pytest.approx(hsic(Xt @ Xt.T, Yt @ Yt.T).item(), rel=1e-9, abs=1e-12)


def test_cka_float32_input_accumulates_in_float64() -> None:
    X = torch.randn(200, 30)
    Y = torch.randn(200, 4) + X[:, :4]
    out = cka(X, Y)
    assert out.dtype == torch.float64
    expected = ref_alignment(X.double().numpy() @ X.double().numpy().T, Y.double().numpy() @ Y.double().numpy().T)
    assert out.item() == pytest.approx(expected, rel=1e-10)


def test_inputs_are_not_modified() -> None:
    X64, X32, Y = torch.randn(30, 4, dtype=torch.float64) + 3, torch.randn(30, 50) + 1, torch.randn(30, 2) - 2
    copies = [t.clone() for t in (X64, X32, Y)]
    cka(X64, Y, debiased=True)
    cka(X32, X64, method="gram")
    est = StreamingCKA()
    est.update([X64, X32], [Y])
    for t, c in zip((X64, X32, Y), copies):
        assert torch.equal(t, c)


def test_cka_flattens_trailing_dims_and_accepts_vectors() -> None:
    X = torch.randn(12, 2, 3, 4, dtype=torch.float64)
    y = torch.randn(12, dtype=torch.float64)
    Xf = X.reshape(12, -1)
    expected = ref_alignment((Xf @ Xf.T).numpy(), np.outer(y.numpy(), y.numpy()))
    assert cka(X, y).item() == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------- invariances and the value 1
@SETTINGS
@given(
    P=samples,
    d=st.integers(1, 12),
    c=st.integers(1, 4),
    seed=seeds,
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-100, 100),
)
def test_cka_invariances(P: int, d: int, c: int, seed: int, scale: float, shift: float) -> None:
    X, Y = rng_matrix(seed, P, d), rng_matrix(seed + 7, P, c)
    Y[:, : min(c, d)] += 0.7 * X[:, : min(c, d)]
    Q = random_orthogonal(seed + 3, d)
    t = rng_matrix(seed + 5, 1, d) * shift
    base = cka(torch.tensor(X), torch.tensor(Y)).item()
    for debiased in (False, True):
        ref = cka(torch.tensor(X), torch.tensor(Y), debiased=debiased).item()
        moved = cka(torch.tensor(scale * X @ Q + t), torch.tensor(Y), debiased=debiased).item()
        assert moved == pytest.approx(ref, rel=1e-7, abs=1e-9)
    assert 0.0 <= base <= 1.0 + 1e-12


def test_cka_is_not_invariant_to_anisotropic_scaling() -> None:
    """Sanity check that the invariance test can fail: stretching one axis changes CKA."""
    X, Y = rng_matrix(0, 40, 3), rng_matrix(1, 40, 2)
    Y[:, 0] += X[:, 0]
    stretched = X * np.array([10.0, 1.0, 1.0])
    before, after = cka(torch.tensor(X), torch.tensor(Y)).item(), cka(torch.tensor(stretched), torch.tensor(Y)).item()
    assert abs(before - after) > 1e-2


@SETTINGS
@given(P=st.integers(7, 30), c=st.integers(1, 5), extra=st.integers(0, 6), seed=seeds, scale=st.floats(1e-2, 1e2))
def test_cka_is_one_for_rotated_centered_labels(P: int, c: int, extra: int, seed: int, scale: float) -> None:
    y = np.random.default_rng(seed).integers(0, c + 1, size=P)
    y[: c + 1] = np.arange(c + 1)  # every class present
    Y = np.eye(c + 1)[y]
    Yc = Y - Y.mean(0)
    d = c + 1 + extra
    Q = random_orthogonal(seed + 1, d)[: c + 1]  # orthonormal rows: Yc Q is a rotation into d dimensions
    F = scale * Yc @ Q
    assert cka(torch.tensor(F), torch.tensor(Y)).item() == pytest.approx(1.0, abs=1e-9)
    assert cka(torch.tensor(F), torch.tensor(Y), method="gram").item() == pytest.approx(1.0, abs=1e-9)


@SETTINGS
@given(P=st.integers(2, 20), r1=st.integers(1, 8), r2=st.integers(1, 8), seed=seeds)
def test_alignment_of_psd_kernels_in_unit_interval(P: int, r1: int, r2: int, seed: int) -> None:
    A, B, G = rng_matrix(seed, P, r1), rng_matrix(seed + 1, P, r2), rng_matrix(seed + 2, P, 3)
    K, L = A @ A.T, (B @ B.T) * (G @ G.T)  # a linear kernel and a Schur product of two (PSD by Schur)
    try:
        value = alignment(torch.tensor(K), torch.tensor(L)).item()
    except DegenerateKernelError:
        return  # e.g. a rank-one kernel of constant vectors
    assert -1e-12 <= value <= 1.0 + 1e-12
    assert value == pytest.approx(ref_alignment(K, L), rel=1e-9, abs=1e-12)


def test_alignment_can_be_negative_for_indefinite_kernels() -> None:
    """The [0, 1] range is a property of PSD kernels, not of the formula: the test above can fail."""
    K = rng_matrix(3, 6, 6)
    K = K + K.T
    assert alignment(torch.tensor(K), -torch.tensor(K)).item() == pytest.approx(-1.0)


# ---------------------------------------------------------------- unbiased HSIC and debiased CKA
@pytest.mark.parametrize("n", [4, 5, 6])
def test_unbiased_hsic_matches_u_statistic(n: int) -> None:
    X, Y = rng_matrix(n, n, 3) + 1.0, rng_matrix(n + 10, n, 2)
    K, L = X @ X.T, Y @ Y.T
    expected = ref_hsic_ustat(K, L)
    assert ref_hsic_unbiased(K, L) == pytest.approx(expected, rel=1e-9)
    assert hsic(torch.tensor(K), torch.tensor(L), unbiased=True).item() == pytest.approx(expected, rel=1e-9)
    for method in ("features", "gram"):
        value = linear_hsic(torch.tensor(X), torch.tensor(Y), unbiased=True, method=method).item()
        assert value == pytest.approx(expected, rel=1e-9)


@SETTINGS
@given(P=st.integers(4, 30), d1=dims, d2=dims, seed=seeds, shift=st.floats(-10, 10))
def test_debiased_cka_feature_space_equals_pxp(P: int, d1: int, d2: int, seed: int, shift: float) -> None:
    X, Y = rng_matrix(seed, P, d1) + shift, rng_matrix(seed + 1, P, d2)
    Y[:, : min(d1, d2)] += X[:, : min(d1, d2)]
    K, L = X @ X.T, Y @ Y.T
    try:
        expected = ref_debiased_cka(X, Y)
    except FloatingPointError:
        return
    if not (ref_hsic_unbiased(K, K) > 1e-9 and ref_hsic_unbiased(L, L) > 1e-9):
        with pytest.raises(DegenerateKernelError):
            cka(torch.tensor(X), torch.tensor(Y), debiased=True)
        return
    for method in ("auto", "features", "gram"):
        value = cka(torch.tensor(X), torch.tensor(Y), debiased=True, method=method).item()
        assert value == pytest.approx(expected, rel=1e-7, abs=1e-9)
        assert abs(value) <= 1.0 + 1e-9
    assert alignment(torch.tensor(K), torch.tensor(L), debiased=True).item() == pytest.approx(
        expected, rel=1e-7, abs=1e-9
    )


def test_debiased_cka_removes_the_bias_of_wide_random_features() -> None:
    """Independent wide features: plain CKA is far from 0 at small P, the debiased estimate is near 0."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(50, 2000, generator=g), torch.randn(50, 2000, generator=g)
    assert cka(X, Y).item() > 0.5
    assert abs(cka(X, Y, debiased=True).item()) < 0.05


# ---------------------------------------------------------------- minibatch CKA
def test_streaming_single_batch_equals_debiased() -> None:
    X, Y = torch.randn(64, 10), torch.randn(64, 3)
    Y[:, 0] += X[:, 0]
    est = StreamingCKA()
    est.update(X, Y)
    assert est.compute().item() == pytest.approx(cka(X, Y, debiased=True).item(), rel=1e-10)


def test_streaming_approaches_full_estimate() -> None:
    g = torch.Generator().manual_seed(1)
    N, d = 4000, 20
    Z = torch.randn(N, 5, generator=g, dtype=torch.float64)
    noise = 0.5 * torch.randn(N, d - 5, generator=g, dtype=torch.float64)
    X = torch.cat([Z, noise], 1) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    Y = Z[:, :3] + 0.3 * Z[:, :3] ** 2 + 0.5 * torch.randn(N, 3, generator=g, dtype=torch.float64)
    full = cka(X, Y, debiased=True).item()
    assert 0.2 < full < 0.6
    assert full == pytest.approx(cka(X, Y).item(), abs=0.01)  # at this P both estimators agree
    for batch in (20, 100):
        est = StreamingCKA()
        for i in range(0, N, batch):
            est.update(X[i : i + batch], Y[i : i + batch])
        assert est.compute().item() == pytest.approx(full, abs=0.015)
    # contrast: averaging the plain (biased) CKA of small batches does not approach the full value
    biased = np.mean([cka(X[i : i + 20], Y[i : i + 20]).item() for i in range(0, N, 20)])
    assert biased - full > 0.05


def test_streaming_matrix_matches_pairs_and_minibatch_cka() -> None:
    g = torch.Generator().manual_seed(2)
    layers = [torch.randn(120, k, generator=g) for k in (3, 50, 200)]
    other = [layers[0] @ torch.randn(3, 4, generator=g), torch.randn(120, 7, generator=g)]
    est = StreamingCKA()
    for i in range(0, 120, 40):
        est.update([f[i : i + 40] for f in layers], [f[i : i + 40] for f in other])
    matrix = est.compute()
    assert matrix.shape == (3, 2)
    for a, fa in enumerate(layers):
        for b, fb in enumerate(other):
            single = minibatch_cka((fa[i : i + 40], fb[i : i + 40]) for i in range(0, 120, 40))
            assert matrix[a, b].item() == pytest.approx(single.item(), rel=1e-10)
    assert est.batches == 3 and est.samples == 120


# ---------------------------------------------------------------- errors
def test_constant_labels_and_dead_features_are_errors() -> None:
    F = torch.randn(20, 5)
    with pytest.raises(DegenerateKernelError, match="F2.*zero after centering"):
        cka(F, torch.ones(20, 1))
    with pytest.raises(DegenerateKernelError, match="F1.*dead layer"):
        cka(torch.zeros(20, 5), torch.randn(20, 2))
    with pytest.raises(DegenerateKernelError, match="L"):
        alignment(F @ F.T, torch.full((20, 20), 3.0))
    with pytest.raises(DegenerateKernelError):
        cka(torch.full((20, 5), 0.1), torch.randn(20, 2))  # constant but not exactly representable mean


def test_mismatched_and_transposed_inputs() -> None:
    F, Y = torch.randn(100, 784), torch.randn(784, 10)
    with pytest.raises(ValueError, match="samples x features"):
        cka(torch.randn(10, 3), torch.randn(11, 3))
    with pytest.raises(ValueError, match=r"F1 \(10 x 100\) looks transposed"):
        cka(torch.randn(10, 100), torch.randn(100, 3))
    with pytest.raises(ValueError, match="F2 .* looks transposed"):
        cka(Y, F)
    with pytest.raises(ValueError, match="square"):
        alignment(torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="same P"):
        alignment(torch.eye(4), torch.eye(5))


def test_nonfinite_and_small_batches() -> None:
    F = torch.randn(10, 3)
    F[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        cka(F, torch.randn(10, 2))
    with pytest.raises(ValueError, match="NaN or infinite"):
        alignment(torch.eye(3) * float("inf"), torch.eye(3))
    with pytest.raises(ValueError, match="at least 4"):
        cka(torch.randn(3, 2), torch.randn(3, 2), debiased=True)
    est = StreamingCKA()
    with pytest.raises(ValueError, match="at least 4"):
        est.update(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="no batches"):
        est.compute()
    with pytest.raises(ValueError, match="at least 2"):
        cka(torch.randn(1, 2), torch.randn(1, 2))
    with pytest.raises(ValueError, match="method"):
        cka(torch.randn(5, 2), torch.randn(5, 2), method="fast")


def test_debiased_undefined_when_off_diagonal_vanishes() -> None:
    """One-hot features with one sample each: K~ = 0, HSIC_u(K, K) = 0, the debiased CKA is 0/0."""
    with pytest.raises(DegenerateKernelError, match="not positive"):
        cka(torch.eye(6), torch.randn(6, 2), debiased=True)
