"""Shared kernel mathematics: centering, centered kernel alignment, linear CKA (plain, debiased, minibatch).

Conventions. A *feature matrix* is **samples x features** (``P x d``, one row per sample; inputs
with more than two dimensions are flattened per sample). A *kernel matrix* is ``P x P``.
Everything is accumulated in float64 on the inputs' device.

- Centered alignment (Cortes, Mohri & Rostamizadeh 2012, "Algorithms for learning kernels based
  on centered alignment"): ``rho(K, L) = <Kc, Lc>_F / (||Kc||_F ||Lc||_F)`` with ``Kc = C K C`` and
  ``C = I - 11^T / P``.
- Linear CKA (Kornblith, Norouzi, Lee & Hinton 2019) is ``rho(X X^T, Y Y^T)``. Because
  ``C X X^T C = Xc Xc^T`` for the column-centered ``Xc``, it has the feature-space form
  ``||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``, which never builds a ``P x P`` matrix.
- Debiased CKA uses the unbiased HSIC estimator of Song, Smola, Gretton, Bedo & Borgwardt 2012,
  ``HSIC_u = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((P-1)(P-2)) - 2/(P-2) 1^T K~ L~ 1] / (P (P-3))``
  (``K~`` is ``K`` with its diagonal zeroed), in place of the biased ``<Kc, Lc>_F``.
- Minibatch CKA (Nguyen, Raghu & Kornblith 2021, "Do wide and deep networks learn the same
  things?") averages ``HSIC_u`` over batches before forming the ratio: ``StreamingCKA``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

METHODS = ("auto", "features", "gram")

#: a kernel (or feature matrix) whose centered norm is below this fraction of its raw norm counts as zero
DEGENERATE_RTOL = 1e-10


class DegenerateKernelError(ValueError):
    """A kernel centers to (numerically) zero, so an alignment would be 0/0."""


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def _as_tensor(a, name: str, who: str) -> torch.Tensor:
    if not isinstance(a, torch.Tensor):
        try:
            a = torch.as_tensor(a)
        except Exception as exc:  # noqa: BLE001 - anything that is not array-like
            raise TypeError(f"{who}: {name} must be a tensor or array, got {type(a).__name__}") from exc
    if a.is_complex():
        raise TypeError(f"{who}: {name} is complex; kernels here are real")
    return a


def _check_finite(a: torch.Tensor, name: str, who: str) -> None:
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"{who}: {name} contains NaN or infinite values")


def as_features(F, name: str = "F", who: str = "kernels") -> torch.Tensor:
    """``F`` as a float64 ``P x d`` matrix: samples are rows; 1-D is one feature, >2-D is flattened per sample.

    Args:
        F: a tensor or array-like, samples along the first axis.
        name: the argument's name in error messages.
        who: the function name that error messages start with.

    Returns:
        A ``P x d`` float64 tensor on ``F``'s device (``F`` itself when it already is one).

    Raises:
        TypeError: ``F`` is not array-like, or is complex.
        ValueError: ``F`` is a scalar, has fewer than 2 samples, or has no features.
    """
    return _features64(F, name, who)[0]


def _features64(F, name: str, who: str) -> tuple[torch.Tensor, bool]:
    """``as_features`` and whether the result is a fresh copy (then it may be centered in place)."""
    F = _as_tensor(F, name, who)
    if F.ndim == 0:
        raise ValueError(f"{who}: {name} must be samples x features, got a scalar")
    if F.ndim == 1:
        F = F.reshape(-1, 1)
    elif F.ndim > 2:
        F = F.reshape(F.shape[0], -1)
    if F.shape[0] < 2:
        raise ValueError(f"{who}: {name} has {F.shape[0]} sample(s); centering needs at least 2 (rows are samples)")
    if F.shape[1] == 0:
        raise ValueError(f"{who}: {name} has no features (shape {tuple(F.shape)})")
    X = F.to(torch.float64)
    return X, X.data_ptr() != F.data_ptr()


def _check_pair(F1: torch.Tensor, F2: torch.Tensor, who: str, names=("F1", "F2")) -> None:
    """Same sample count; name a transposed argument when the shapes give it away."""
    (n1, d1), (n2, d2) = F1.shape, F2.shape
    if n1 == n2:
        return
    a, b = names
    hint = ""
    if d1 == n2 and d1 > n1:
        hint = f"; {a} ({n1} x {d1}) looks transposed: pass {a}.T"
    elif d2 == n1 and d2 > n2:
        hint = f"; {b} ({n2} x {d2}) looks transposed: pass {b}.T"
    raise ValueError(
        f"{who}: {a} has {n1} samples (rows) and {b} has {n2}; inputs are samples x features "
        f"with one row per sample{hint}"
    )


def _as_kernel(K, name: str, who: str) -> torch.Tensor:
    K = _as_tensor(K, name, who)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"{who}: {name} must be a square P x P kernel matrix, got shape {tuple(K.shape)}")
    if K.shape[0] < 2:
        raise ValueError(f"{who}: {name} is {K.shape[0]} x {K.shape[0]}; centering needs at least 2 samples")
    return K.to(torch.float64)


# --------------------------------------------------------------------------------------------
# centering and kernel-matrix forms
# --------------------------------------------------------------------------------------------
def center(K: torch.Tensor) -> torch.Tensor:
    """Double-centered kernel ``C K C`` (``C = I - 11^T/P``) by mean subtraction, in float64.

    ``Kc_ij = K_ij - mean_i' K_i'j - mean_j' K_ij' + mean K``: no ``P x P`` product is formed.

    Args:
        K: a ``P x P`` kernel matrix (tensor or array-like), ``P >= 2``.

    Returns:
        ``Kc``, ``P x P`` float64 on ``K``'s device.

    Raises:
        TypeError: ``K`` is not array-like, or is complex.
        ValueError: ``K`` is not square or has fewer than 2 rows.
    """
    K = _as_kernel(K, "K", "center")
    col, row = K.mean(dim=0, keepdim=True), K.mean(dim=1, keepdim=True)
    out = K - col  # the one P x P allocation; the rest is in place
    return out.sub_(row).add_(col.mean())


def center_features(F: torch.Tensor) -> torch.Tensor:
    """Column-centered features ``Fc = F - 1 mean(F)``; ``Fc Fc^T = C F F^T C``.

    Args:
        F: samples x features (see ``as_features``).

    Returns:
        ``Fc``, ``P x d`` float64.

    Raises:
        TypeError: as ``as_features``.
        ValueError: as ``as_features``.
    """
    F = as_features(F, "F", "center_features")
    return F - F.mean(dim=0, keepdim=True)


def _degenerate(raw_norm: torch.Tensor, centered_norm: torch.Tensor) -> torch.Tensor:
    """True where a matrix is zero after centering, up to rounding (a 0-d bool tensor, no sync)."""
    return centered_norm <= DEGENERATE_RTOL * raw_norm


def _raise_degenerate(name: str, who: str, what: str = "kernel") -> None:
    raise DegenerateKernelError(
        f"{who}: the {what} {name} is (numerically) zero after centering, so its alignment is 0/0; "
        "this happens with constant labels, a dead layer, or features that are the same for every sample"
    )


def hsic(K: torch.Tensor, L: torch.Tensor, *, unbiased: bool = False) -> torch.Tensor:
    """HSIC of two ``P x P`` kernel matrices (0-d float64 tensor).

    Biased (Gretton et al. 2005): ``tr(K C L C) / (P-1)^2 = <Kc, Lc>_F / (P-1)^2``.
    Unbiased (Song et al. 2012), ``P >= 4``: ``[tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((P-1)(P-2))
    - 2/(P-2) 1^T K~ L~ 1] / (P (P-3))`` with ``K~ = K - diag(K)``.

    Args:
        K: a ``P x P`` kernel matrix.
        L: a ``P x P`` kernel matrix, same ``P``.
        unbiased: use Song et al.'s unbiased estimator.

    Returns:
        A 0-d float64 tensor.

    Raises:
        TypeError: an argument is not array-like, or is complex.
        ValueError: the shapes differ or are not square, ``P < 2`` (``P < 4`` when unbiased), or NaN or
            infinite entries.
    """
    who = "hsic"
    K, L = _as_kernel(K, "K", who), _as_kernel(L, "L", who)
    if K.shape != L.shape:
        raise ValueError(f"{who}: K is {tuple(K.shape)} and L is {tuple(L.shape)}; both must be P x P for the same P")
    _check_finite(K, "K", who)
    _check_finite(L, "L", who)
    n = K.shape[0]
    if not unbiased:
        return torch.dot(center(K).reshape(-1), center(L).reshape(-1)) / (n - 1) ** 2
    if n < 4:
        raise ValueError(f"{who}: the unbiased HSIC estimator needs at least 4 samples, got {n}")
    Kt = K - torch.diag_embed(torch.diagonal(K))
    Lt = L - torch.diag_embed(torch.diagonal(L))
    kt1, lt1 = Kt.sum(dim=1), Lt.sum(dim=1)
    trace = torch.dot(Kt.reshape(-1), Lt.T.reshape(-1))
    return (trace + kt1.sum() * lt1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * torch.dot(kt1, lt1)) / (n * (n - 3))


def alignment(K: torch.Tensor, L: torch.Tensor, *, debiased: bool = False) -> torch.Tensor:
    """Centered alignment of two ``P x P`` kernel matrices (0-d float64 tensor).

    ``rho(K, L) = <Kc, Lc>_F / (||Kc||_F ||Lc||_F)`` with ``Kc = C K C`` (Cortes, Mohri & Rostamizadeh
    2012); in [0, 1] for positive semi-definite kernels. ``debiased=True`` replaces the three inner
    products by the unbiased HSIC estimator (Song et al. 2012), which needs ``P >= 4``.

    Args:
        K: a ``P x P`` kernel matrix.
        L: a ``P x P`` kernel matrix, same ``P``.
        debiased: use the unbiased HSIC estimator.

    Returns:
        A 0-d float64 tensor.

    Raises:
        DegenerateKernelError: a kernel centers to zero (e.g. ``Y Y^T`` for constant labels), or, debiased, the
            unbiased HSIC of a kernel with itself is not positive.
        TypeError: an argument is not array-like, or is complex.
        ValueError: the shapes differ or are not square, ``P < 2`` (``P < 4`` when debiased), or NaN or
            infinite entries.
    """
    who = "alignment"
    K, L = _as_kernel(K, "K", who), _as_kernel(L, "L", who)
    if K.shape != L.shape:
        raise ValueError(f"{who}: K is {tuple(K.shape)} and L is {tuple(L.shape)}; both must be P x P for the same P")
    Kc, Lc = center(K), center(L)
    nk, nl = torch.linalg.vector_norm(Kc), torch.linalg.vector_norm(Lc)
    flags = torch.stack(
        [
            ~torch.isfinite(K).all(),
            ~torch.isfinite(L).all(),
            _degenerate(torch.linalg.vector_norm(K), nk),
            _degenerate(torch.linalg.vector_norm(L), nl),
        ]
    )
    bad = flags.tolist()  # one host sync for all four checks
    for name, b in zip(("K", "L"), bad[:2]):
        if b:
            raise ValueError(f"{who}: {name} contains NaN or infinite values")
    for name, b in zip(("K", "L"), bad[2:]):
        if b:
            _raise_degenerate(name, who)
    if not debiased:
        return torch.dot(Kc.reshape(-1), Lc.reshape(-1)) / (nk * nl)
    if K.shape[0] < 4:
        raise ValueError(f"{who}: the debiased estimator needs at least 4 samples, got {K.shape[0]}")
    kl, kk, ll = hsic(K, L, unbiased=True), hsic(K, K, unbiased=True), hsic(L, L, unbiased=True)
    n = K.shape[0]
    scales = torch.stack([torch.linalg.vector_norm(Kc), torch.linalg.vector_norm(Lc)]) ** 2 / (n * (n - 3))
    _check_positive(kk, ll, scales, who, ("K", "L"))
    return kl / torch.sqrt(kk * ll)


# --------------------------------------------------------------------------------------------
# feature-space linear CKA
# --------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """One feature matrix, ready for linear-kernel inner products.

    ``Fc`` column-centered features; ``rows`` the diagonal of ``Kc = Fc Fc^T`` (squared row norms);
    ``gram`` ``Kc`` itself when the P x P route was chosen (``d >= P`` or ``method="gram"``);
    ``self_ip`` ``||Kc||_F^2``; ``degenerate`` and ``nonfinite`` 0-d bool tensors (no sync).
    """

    Fc: torch.Tensor
    rows: torch.Tensor
    gram: torch.Tensor | None
    self_ip: torch.Tensor
    degenerate: torch.Tensor
    nonfinite: torch.Tensor

    @property
    def n(self) -> int:
        """``P``, the number of samples."""
        return int(self.Fc.shape[0])


def prepare(F: torch.Tensor, method: str = "auto", inplace: bool = False) -> Prepared:
    """Center float64 features ``F`` (P x d) and compute ``||Kc||_F^2`` by the cheaper route.

    Feature space ``||Fc^T Fc||_F^2`` costs ``P d^2``; the P x P form ``||Fc Fc^T||_F^2`` costs ``P^2 d``.
    ``inplace=True`` centers ``F`` itself (for a private copy). Non-finite entries show up in the
    column means, so ``nonfinite`` costs no extra pass.

    Args:
        F: ``P x d`` float64 features (``as_features`` makes them).
        method: ``"auto"`` (the ``P x P`` form when ``d >= P``), ``"features"`` or ``"gram"``.
        inplace: center ``F`` itself instead of a copy.

    Returns:
        The ``Prepared`` features; its checks are 0-d bool tensors, not yet read on the host.
    """
    n, d = F.shape
    mean = F.mean(dim=0, keepdim=True)
    nonfinite = ~torch.isfinite(mean).all()
    raw = torch.linalg.vector_norm(F)
    Fc = F.sub_(mean) if inplace else F - mean
    rows = torch.linalg.vector_norm(Fc, dim=1).square()
    use_gram = method == "gram" or (method == "auto" and d >= n)
    if use_gram:
        gram = Fc @ Fc.T
        self_ip = torch.dot(gram.reshape(-1), gram.reshape(-1))
    else:
        gram = None
        cov = Fc.T @ Fc
        self_ip = torch.dot(cov.reshape(-1), cov.reshape(-1))
    degenerate = _degenerate(raw, torch.linalg.vector_norm(Fc))
    return Prepared(Fc, rows, gram, self_ip, degenerate, nonfinite)


def _cross_ip(a: Prepared, b: Prepared) -> torch.Tensor:
    """``<Kc_a, Kc_b>_F``: from the two P x P matrices when both exist, else ``||Fc_a^T Fc_b||_F^2``."""
    if a.gram is not None and b.gram is not None:
        return torch.dot(a.gram.reshape(-1), b.gram.reshape(-1))
    cross = a.Fc.T @ b.Fc
    return torch.dot(cross.reshape(-1), cross.reshape(-1))


def _hsic_u(ip: torch.Tensor, a: Prepared, b: Prepared) -> torch.Tensor:
    """Unbiased HSIC of two linear kernels from feature-space quantities (no P x P matrix).

    With centered features (HSIC_u is unchanged by translating the features), ``K~ 1 = -k`` where
    ``k = diag(Kc)`` is the vector of squared row norms, ``tr(K~ L~) = <Kc, Lc> - k.l`` and
    ``1^T K~ 1 = -sum(k)``; Song et al.'s formula becomes
    ``[<Kc, Lc> - P/(P-2) k.l + sum(k) sum(l) / ((P-1)(P-2))] / (P (P-3))``.
    """
    n = a.n
    return (ip - n / (n - 2) * torch.dot(a.rows, b.rows) + a.rows.sum() * b.rows.sum() / ((n - 1) * (n - 2))) / (
        n * (n - 3)
    )


def _check_method(method: str, who: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{who}: method must be one of {METHODS}, got {method!r}")


def _check_positive(xx: torch.Tensor, yy: torch.Tensor, scales: torch.Tensor, who: str, names) -> None:
    """The debiased denominators must be positive: HSIC_u(K, K) can be <= 0 for tiny or odd batches.

    ``scales`` are the sizes of the terms that cancel (``||Kc||_F^2 / (P (P-3))``): a value within
    rounding of zero counts as zero.
    """
    vals = torch.stack([xx, yy, *scales]).tolist()
    for name, v, scale in zip(names, vals[:2], vals[2:]):
        if not v > 1e-10 * scale:
            raise DegenerateKernelError(
                f"{who}: the unbiased HSIC of {name} with itself is {v:.3g} (not positive), so the debiased "
                "CKA is undefined: too few samples, features that center to zero, or kernels whose "
                "off-diagonal part vanishes"
            )


def _prepare_pair(F1, F2, who: str, method: str, names=("F1", "F2")) -> tuple[Prepared, Prepared]:
    _check_method(method, who)
    a, b = names
    (X, fx), (Y, fy) = _features64(F1, a, who), _features64(F2, b, who)
    _check_pair(X, Y, who, names)
    pa, pb = prepare(X, method, inplace=fx), prepare(Y, method, inplace=fy)
    flags = torch.stack([pa.nonfinite, pb.nonfinite, pa.degenerate, pb.degenerate]).tolist()  # one host sync
    for name, nonfinite in zip(names, flags[:2]):
        if nonfinite:
            raise ValueError(f"{who}: {name} contains NaN or infinite values")
    for name, deg in zip(names, flags[2:]):
        if deg:
            _raise_degenerate(name, who, "features")
    return pa, pb


def cka(F1, F2, *, debiased: bool = False, method: str = "auto") -> torch.Tensor:
    """Linear CKA of two feature matrices, **samples x features** (``P x d1`` and ``P x d2``).

    ``||F1c^T F2c||_F^2 / (||F1c^T F1c||_F ||F2c^T F2c||_F)`` (Kornblith et al. 2019), the centered
    alignment of ``F1 F1^T`` and ``F2 F2^T``; compare layers, models, or a layer with labels ``Y``.
    ``method="auto"`` uses a ``d x d`` product for each side with ``d < P`` and the ``P x P`` form
    otherwise; ``"features"`` / ``"gram"`` force one route. ``debiased=True`` uses the unbiased HSIC
    estimator (Song et al. 2012) in its feature-space form (needs ``P >= 4``). float64 throughout.
    A row is a sample: a transposed argument is rejected when the sample counts disagree.

    Args:
        F1: ``P x d1`` features (1-D: one feature; more than 2-D: flattened per sample).
        F2: ``P x d2`` features.
        debiased: use the unbiased HSIC estimator.
        method: ``"auto"``, ``"features"`` or ``"gram"``.

    Returns:
        A 0-d float64 tensor, in [0, 1].

    Raises:
        DegenerateKernelError: features center to zero, or, debiased, a self-HSIC is not positive.
        TypeError: an argument is not array-like, or is complex.
        ValueError: an unknown ``method``, different sample counts, fewer than 2 samples (4 when debiased), no
            features, or NaN or infinite entries.
    """
    who = "cka"
    a, b = _prepare_pair(F1, F2, who, method)
    ip = _cross_ip(a, b)
    if not debiased:
        return ip / torch.sqrt(a.self_ip * b.self_ip)
    if a.n < 4:
        raise ValueError(
            f"{who}: the debiased estimator needs at least 4 samples, got {a.n} (other CKA libraries return NaN here)"
        )
    xy, xx, yy = _hsic_u(ip, a, b), _hsic_u(a.self_ip, a, a), _hsic_u(b.self_ip, b, b)
    scales = torch.stack([a.self_ip, b.self_ip]) / (a.n * (a.n - 3))
    _check_positive(xx, yy, scales, who, ("F1", "F2"))
    return xy / torch.sqrt(xx * yy)


def linear_hsic(F1, F2, *, unbiased: bool = False, method: str = "auto") -> torch.Tensor:
    """HSIC of the linear kernels of two feature matrices (samples x features), in feature space.

    Biased: ``||F1c^T F2c||_F^2 / (P-1)^2``; unbiased: Song et al. 2012 in the feature-space form of
    ``_hsic_u`` (``P >= 4``). Equals ``hsic(F1 F1^T, F2 F2^T, unbiased=...)`` without the P x P matrices.

    Args:
        F1: ``P x d1`` features.
        F2: ``P x d2`` features.
        unbiased: use the unbiased estimator.
        method: ``"auto"``, ``"features"`` or ``"gram"``.

    Returns:
        A 0-d float64 tensor.

    Raises:
        TypeError: an argument is not array-like, or is complex.
        ValueError: an unknown ``method``, different sample counts, fewer than 2 samples (4 when unbiased), no
            features, or NaN or infinite entries.
    """
    who = "linear_hsic"
    _check_method(method, who)
    (X, fx), (Y, fy) = _features64(F1, "F1", who), _features64(F2, "F2", who)
    _check_pair(X, Y, who)
    a, b = prepare(X, method, inplace=fx), prepare(Y, method, inplace=fy)
    for name, bad in zip(("F1", "F2"), torch.stack([a.nonfinite, b.nonfinite]).tolist()):
        if bad:
            raise ValueError(f"{who}: {name} contains NaN or infinite values")
    ip = _cross_ip(a, b)
    if not unbiased:
        return ip / (a.n - 1) ** 2
    if a.n < 4:
        raise ValueError(f"{who}: the unbiased estimator needs at least 4 samples, got {a.n}")
    return _hsic_u(ip, a, b)


# --------------------------------------------------------------------------------------------
# minibatch (streaming) CKA
# --------------------------------------------------------------------------------------------
class StreamingCKA:
    """Minibatch linear CKA (Nguyen, Raghu & Kornblith 2021) for data that does not fit one batch.

    ``CKA = mean_b HSIC_u(X_b, Y_b) / sqrt(mean_b HSIC_u(X_b, X_b) mean_b HSIC_u(Y_b, Y_b))`` with the
    unbiased estimator (Song et al. 2012) in feature space, so the average over batches is an unbiased
    estimate of each population HSIC and the ratio converges as batches accumulate (the biased
    estimator would not: its per-batch bias does not average out). Every batch needs ``>= 4`` samples,
    given as **samples x features**.

    ``update(X, Y)`` takes two feature matrices (``compute()`` is a 0-d tensor), or two sequences of
    them, e.g. all layers of two networks (``compute()`` is the ``len(X) x len(Y)`` CKA matrix).
    Sums stay on the device; ``update`` syncs once per call for its input checks.

    Args:
        method: how each batch's HSIC is computed, as for ``cka`` (``"auto"`` picks by the batch's shape).
    """

    def __init__(self, method: str = "auto") -> None:
        _check_method(method, "StreamingCKA")
        self.method = method
        self.reset()

    def reset(self) -> None:
        """Forget every batch."""
        self.batches = 0
        self.samples = 0
        self._xy: torch.Tensor | None = None
        self._xx: torch.Tensor | None = None
        self._yy: torch.Tensor | None = None
        self._sxx: torch.Tensor | None = None
        self._syy: torch.Tensor | None = None
        self._shape: tuple[int, int] | None = None
        self._single: bool | None = None

    def update(self, X: torch.Tensor | Sequence[torch.Tensor], Y: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Add one batch.

        Args:
            X: ``P x d`` features, or a list or tuple of them (the same ``P``).
            Y: the same kind as ``X``: one feature matrix, or a sequence.

        Raises:
            TypeError: one of ``X``, ``Y`` is a sequence and the other is not; a non-array or complex input.
            ValueError: an empty sequence, a different number of matrices than in earlier batches, different
                sample counts, fewer than 4 samples, or NaN or infinite entries.
        """
        who = "StreamingCKA.update"
        single = isinstance(X, torch.Tensor) or not isinstance(X, (list, tuple))
        if single != (isinstance(Y, torch.Tensor) or not isinstance(Y, (list, tuple))):
            raise TypeError(f"{who}: give two feature matrices or two sequences of them, not one of each")
        xs = [X] if single else list(X)
        ys = [Y] if single else list(Y)
        if not xs or not ys:
            raise ValueError(f"{who}: empty sequence of feature matrices")
        shape = (len(xs), len(ys))
        if self._shape is not None and (shape != self._shape or single != self._single):
            raise ValueError(f"{who}: this estimator accumulates {self._shape} pairs, got {shape}")
        cx = [_features64(x, f"X[{i}]", who) for i, x in enumerate(xs)]
        cy = [_features64(y, f"Y[{j}]", who) for j, y in enumerate(ys)]
        fresh = [f for _, f in cx + cy]
        fx, fy = [f for f, _ in cx], [f for f, _ in cy]
        n = fx[0].shape[0]
        for i, f in enumerate(fx):
            _check_pair(fx[0], f, who, ("X[0]", f"X[{i}]"))
        for j, f in enumerate(fy):
            _check_pair(fx[0], f, who, ("X[0]", f"Y[{j}]"))
        if n < 4:
            raise ValueError(
                f"{who}: a batch of {n} samples is too small for the unbiased HSIC estimator "
                "(it needs at least 4; other CKA libraries return NaN here)"
            )
        prepared = [prepare(f, self.method, inplace=fr) for f, fr in zip(fx + fy, fresh)]
        px, py = prepared[: len(fx)], prepared[len(fx) :]
        bad = torch.stack([p.nonfinite for p in prepared]).tolist()  # one host sync
        names = [f"X[{i}]" for i in range(len(fx))] + [f"Y[{j}]" for j in range(len(fy))]
        for name, b in zip(names, bad):
            if b:
                raise ValueError(f"{who}: {name} contains NaN or infinite values")
        xx = torch.stack([_hsic_u(p.self_ip, p, p) for p in px])
        yy = torch.stack([_hsic_u(p.self_ip, p, p) for p in py])
        sxx = torch.stack([p.self_ip for p in px]) / (n * (n - 3))  # scales of the cancelling terms
        syy = torch.stack([p.self_ip for p in py]) / (n * (n - 3))
        xy = torch.stack([torch.stack([_hsic_u(_cross_ip(a, b), a, b) for b in py]) for a in px])
        if self._xy is None:
            self._xy, self._xx, self._yy, self._sxx, self._syy = xy, xx, yy, sxx, syy
            self._shape, self._single = shape, single
        else:
            # all five are set together on the first batch
            assert self._xx is not None and self._yy is not None and self._sxx is not None and self._syy is not None
            self._xy, self._xx, self._yy = self._xy + xy, self._xx + xx, self._yy + yy
            self._sxx, self._syy = self._sxx + sxx, self._syy + syy
        self.batches += 1
        self.samples += n

    def compute(self) -> torch.Tensor:
        """The minibatch CKA so far.

        Returns:
            A 0-d float64 tensor for feature matrices, the ``len(X) x len(Y)`` CKA matrix for sequences.

        Raises:
            ValueError: no batch yet.
            DegenerateKernelError: an averaged self-HSIC is not positive.
        """
        who = "StreamingCKA.compute"
        if self._xy is None:
            raise ValueError(f"{who}: no batches yet; call update(X, Y) first")
        # all five are set together on the first batch
        assert self._xx is not None and self._yy is not None and self._sxx is not None and self._syy is not None
        xx, yy = self._xx / self.batches, self._yy / self.batches
        vals = torch.cat([xx, yy]).tolist()
        scales = torch.cat([self._sxx, self._syy]).tolist()
        names = [f"X[{i}]" for i in range(len(xx))] + [f"Y[{j}]" for j in range(len(yy))]
        for name, v, scale in zip(names, vals, scales):
            if not v > 1e-10 * scale / self.batches:
                raise DegenerateKernelError(
                    f"{who}: the averaged unbiased HSIC of {name} with itself is {v:.3g} (not positive): "
                    "its features center to zero or vary too little across samples"
                )
        out = (self._xy / self.batches) / torch.sqrt(xx[:, None] * yy[None, :])
        return out[0, 0] if self._single else out


def minibatch_cka(batches, method: str = "auto") -> torch.Tensor:
    """Minibatch CKA over an iterable of ``(X_b, Y_b)`` pairs (samples x features): see ``StreamingCKA``.

    Args:
        batches: an iterable of ``(X_b, Y_b)``, each a feature matrix or a sequence of them.
        method: ``"auto"``, ``"features"`` or ``"gram"``.

    Returns:
        A 0-d float64 tensor, or the CKA matrix for sequences.

    Raises:
        ValueError: as ``StreamingCKA.update`` and ``StreamingCKA.compute``.
        TypeError: as ``StreamingCKA.update``.
        DegenerateKernelError: as ``StreamingCKA.compute``.
    """
    est = StreamingCKA(method)
    for X, Y in batches:
        est.update(X, Y)
    return est.compute()


__all__ = [
    "DegenerateKernelError",
    "as_features",
    "center",
    "center_features",
    "hsic",
    "alignment",
    "cka",
    "linear_hsic",
    "StreamingCKA",
    "minibatch_cka",
]
