"""Eigen statistics of a symmetric positive semi-definite matrix (a kernel), in float64.

- eigenvalues ``lambda_1 <= ... <= lambda_P`` by ``torch.linalg.eigvalsh`` of ``(K + K^T) / 2`` in float64;
- ``trace = sum_k lambda_k`` (taken from the diagonal, exact), ``eig_max``, ``eig_min`` (for a singular
  kernel a rounding-level number, possibly slightly negative);
- condition number ``lambda_max / lambda_min``, ``inf`` when ``lambda_min <= P eps lambda_max`` (numerically
  singular: the smallest eigenvalue is rounding noise);
- effective rank ``exp(H(p))``, ``p_k = max(lambda_k, 0) / sum_k max(lambda_k, 0)``, ``H`` the Shannon entropy
  (Roy & Vetterli 2007): 1 for a rank-one kernel, ``P`` for a multiple of the identity;
- alignment with labels: centered alignment ``rho(K, Y Y^T)`` (Cortes, Mohri & Rostamizadeh 2012), through
  ``probes.functional.alignment.alignment``;
- distance between two kernels ``1 - <A, B>_F / (||A||_F ||B||_F)`` (the NTK "distance from init"; clamped
  at 0 against rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probes.functional.alignment import alignment as _centered_alignment


@dataclass
class Spectrum:
    """Eigenvalues (ascending, float64) and the statistics derived from them (0-d float64 tensors)."""

    eigenvalues: torch.Tensor
    trace: torch.Tensor
    eig_max: torch.Tensor
    eig_min: torch.Tensor
    condition: torch.Tensor
    effective_rank: torch.Tensor

    def top(self, k: int) -> torch.Tensor:
        """The ``k`` largest eigenvalues, largest first."""
        return self.eigenvalues.flip(0)[:k]


def _as_symmetric(K, who: str, rtol: float = 1e-6) -> torch.Tensor:
    if not isinstance(K, torch.Tensor):
        K = torch.as_tensor(K)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(f"{who}: need a non-empty square matrix, got shape {tuple(K.shape)}")
    if K.is_complex():
        raise TypeError(f"{who}: the matrix is complex; kernels here are real")
    K = K.to(torch.float64)
    norms = torch.stack([torch.linalg.vector_norm(K - K.T), torch.linalg.vector_norm(K),
                         (~torch.isfinite(K)).any().double()]).tolist()
    if norms[2]:
        raise ValueError(f"{who}: the matrix contains NaN or infinite values")
    if norms[0] > rtol * norms[1]:
        raise ValueError(f"{who}: the matrix is not symmetric (||K - K^T|| / ||K|| = {norms[0] / norms[1]:.3g})")
    return (K + K.T) / 2


def eigenvalues(K: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the symmetric matrix ``K`` in ascending order (float64)."""
    return torch.linalg.eigvalsh(_as_symmetric(K, "eigenvalues"))


def effective_rank(eigs: torch.Tensor) -> torch.Tensor:
    """``exp(entropy(lambda / sum lambda))`` of non-negative eigenvalues (negatives count as 0)."""
    lam = eigs.to(torch.float64).clamp(min=0)
    total = lam.sum()
    p = lam / torch.where(total > 0, total, torch.ones_like(total))
    h = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum()
    return torch.where(total > 0, torch.exp(h), torch.zeros_like(h))


def condition_number(eigs: torch.Tensor) -> torch.Tensor:
    """``lambda_max / lambda_min``; ``inf`` when ``lambda_min <= n eps lambda_max`` (numerically singular)."""
    lam = eigs.to(torch.float64)
    lo, hi = lam.min(), lam.max()
    floor = lam.numel() * torch.finfo(torch.float64).eps * hi.abs()
    return torch.where(lo > floor, hi / torch.where(lo > 0, lo, torch.ones_like(lo)),
                       torch.full_like(hi, float("inf")))


def spectrum(K: torch.Tensor) -> Spectrum:
    """Eigenvalues and statistics of the symmetric PSD matrix ``K`` (float64, on ``K``'s device)."""
    S = _as_symmetric(K, "spectrum")
    lam = torch.linalg.eigvalsh(S)
    return Spectrum(lam, torch.diagonal(S).sum(), lam[-1], lam[0], condition_number(lam), effective_rank(lam))


def label_alignment(K: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Centered alignment of the ``P x P`` kernel ``K`` with ``Y Y^T`` (``Y`` P x C, e.g. +-1 labels or one-hot).

    ``<Kc, (YY^T)c>_F / (||Kc||_F ||(YY^T)c||_F)``; raises ``probes.functional.alignment.DegenerateKernelError`` for
    constant labels.
    """
    Y = Y.to(torch.float64).reshape(Y.shape[0], -1)
    if Y.shape[0] != K.shape[0]:
        raise ValueError(f"label_alignment: {Y.shape[0]} label rows for a {K.shape[0]} x {K.shape[1]} kernel")
    Y = Y.to(K.device)
    return _centered_alignment(K.to(torch.float64), Y @ Y.T)


def kernel_distance(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``1 - <A, B>_F / (||A||_F ||B||_F)`` (0 for proportional kernels; in [0, 1] for PSD kernels)."""
    if A.shape != B.shape:
        raise ValueError(f"kernel_distance: shapes {tuple(A.shape)} and {tuple(B.shape)} differ")
    a, b = A.reshape(-1).to(torch.float64), B.reshape(-1).to(torch.float64).to(A.device)
    cos = torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return (1.0 - cos).clamp(min=0.0)  # rounding can push the cosine of equal kernels just above 1


__all__ = ["Spectrum", "eigenvalues", "effective_rank", "condition_number", "spectrum", "label_alignment",
           "kernel_distance"]
