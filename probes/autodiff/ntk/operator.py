"""The matrix-free kernel ``ntk_operator``: ``Theta V`` from the layerwise factors, never ``P x P``.

For ``D`` held: ``D (D^T V)``; for factors: ``W = sum_j v_j g_j z_j^T``, then ``(Theta v)_i = sum_k g_ik^T W z_ik``;
for embeddings a scatter-add into the table. The diagonal is exact (per-sample gradient norms). Factors are
first expressed in bases of their row spaces when those are much smaller (``_compressed``; in trace mode the
``C n`` output-gradient axis of the layer before a linear head has rank ``n``), which keeps every inner product.
"""

from __future__ import annotations

from typing import Any

import torch

from probes.autodiff.ntk.ranks import Share, local_rows
from probes.functional.ntk.settings import DEFAULT, NTKSettings
from probes.functional.ntk.terms import _Grad, _Pairs, _Term


def _block_rows(P: int, per_row: int, itemsize: int, settings: NTKSettings = DEFAULT) -> int:
    return max(1, min(P, settings.strip_bytes // max(1, per_row * itemsize)))


def _row_basis(F2: torch.Tensor, dtype: torch.dtype, settings: NTKSettings = DEFAULT) -> torch.Tensor | None:
    """An orthonormal basis ``Q`` (m x r) of the row space of ``F2`` (rows x m) when ``r <= settings.compress_ratio m``.

    From the eigenvectors of the Gram ``F2^T F2`` (float64, accumulated by row blocks) whose eigenvalues exceed
    ``m eps lambda_max``: ``F2 Q Q^T = F2`` up to that level, so every inner product ``f . f'`` of two rows is kept.
    """
    rows, m = F2.shape
    if m < 16 or m > settings.compress_max or rows < 2 * m:  # the Gram and its eigh must pay off over many products
        return None
    eps, tiny = torch.finfo(torch.float64).eps, torch.finfo(torch.float64).tiny
    if rows > 4 * m:  # rank of 2m spread rows first (a lower bound of the rank): cheap rejection of full rank
        sub = F2[torch.linspace(0, rows - 1, 2 * m, device=F2.device).long()].to(torch.float64)
        lam = torch.linalg.eigvalsh(sub.T @ sub)
        if int((lam > m * eps * lam[-1].clamp(min=tiny)).sum()) > settings.compress_ratio * m:
            return None
    step = _block_rows(rows, m, 8, settings)
    gram = torch.zeros(m, m, dtype=torch.float64, device=F2.device)
    for s in range(0, rows, step):
        blk = F2[s : s + step].to(torch.float64)
        gram += blk.T @ blk
    lam, vec = torch.linalg.eigh(gram)
    keep = lam > m * eps * lam[-1].clamp(min=tiny)
    if int(keep.sum()) > settings.compress_ratio * m:
        return None
    return vec[:, keep].to(dtype)


def _compressed(t: _Pairs, dtype: torch.dtype, settings: NTKSettings = DEFAULT) -> _Pairs:
    """``G`` and ``Z`` of a one-group layer expressed in bases of their row spaces (inner products unchanged):
    e.g. in ``mode="trace"`` the ``C n`` output-gradient axis of the layer before a linear head has rank ``n``.
    Costs one Gram per factor (about two or three products ``Theta V``); each product then shrinks likewise."""
    P, Ce, K, g, n = t.G.shape
    if g != 1:
        return t
    G, Z = t.G, t.Z
    Q = _row_basis(G.reshape(-1, n), dtype, settings)
    if Q is not None:
        G = torch.cat([G[s : s + 4096].to(dtype).reshape(-1, n) @ Q for s in range(0, P, 4096)])
        G = G.reshape(P, Ce, K, 1, -1)
    d = Z.shape[-1]
    Q = _row_basis(Z.reshape(-1, d), dtype, settings)
    if Q is not None:
        Z = (Z.to(dtype).reshape(-1, d) @ Q).reshape(P, K, 1, -1)
    return _Pairs(G, Z)


class NTKOperator:
    """``Theta`` (``n x n``, ``n = P`` or ``P C``) as an operator over the layerwise factors, never ``n x n``.

    ``matmat(V)`` = ``Theta V`` (``V``: ``n`` or ``n x b``), blockwise over samples: per-sample gradients held
    as ``D`` give ``D (D^T V)``; factors give ``W = sum_j v_j sum_k g_jk z_jk^T`` per group, then
    ``(Theta v)_i = sum_k g_ik^T W z_ik`` (embeddings: ``W`` scatter-added by token, then gathered); fallback
    Jacobians are held when they fit ``settings.fallback_budget``, else recomputed twice per product.
    ``diagonal()`` is exact: the squared norms of the per-sample gradients (``sum_{k,k'}`` within a sample).
    Work per product: about ``2 P C_e K g n d`` per layer and vector, memory: the factors. Built by
    ``ntk_operator``.

    Attributes:
        P: samples.
        Ce: rows per sample (``C`` in ``mode="full"``, else 1).
        dtype: the precision of the products.
        device: where the factors and the products are.
        scale: ``1 / C`` for ``reduction="mean"``, else 1.
        share: across ranks (``ntk_operator(..., distributed=True)``), this rank's share of the samples: it holds
            their factors only (``probes.autodiff.ntk.ranks``); None in one process.
        rows: samples whose factors this process holds (``P``, or the share's padded size).
        products: vectors multiplied so far (columns of every ``V`` given to ``matmat``).
    """

    def __init__(
        self,
        terms: list[_Term],
        fallback: list[tuple[torch.Tensor | None, Any]],
        P: int,
        Ce: int,
        dtype: torch.dtype,
        device: torch.device,
        scale: float = 1.0,
        share: Share | None = None,
        settings: NTKSettings = DEFAULT,
    ) -> None:
        self.terms, self.fallback = terms, fallback
        self.settings = settings
        self.P, self.Ce, self.dtype, self.device, self.scale = P, Ce, dtype, device, scale
        self.share = share
        self.rows = share.S if share is not None else P  # samples whose factors this process holds
        self.products = 0

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``, ``n = P Ce``."""
        return (self.P * self.Ce, self.P * self.Ce)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``Theta V``.

        Across ranks (``share``), every rank calls this with the same ``V`` and gets the same ``Theta V``: each
        term's partial product over this rank's samples, one all-reduce of them all, each rank's rows, one
        all-gather.

        Args:
            V: ``n`` values or an ``n x b`` block (``n = shape[0]``), on the operator's device.

        Returns:
            ``Theta V`` in the operator's dtype, shaped like ``V``.

        Raises:
            ValueError: ``V`` does not have ``n`` rows.
        """
        vec = V.ndim == 1
        V = (V[:, None] if vec else V).to(self.dtype)
        if V.shape[0] != self.shape[0]:
            raise ValueError(f"NTKOperator.matmat: V has {V.shape[0]} rows for an {self.shape[0]}-row kernel")
        if self.share is None:  # one term's W at a time (a W is as large as the term's parameters times b)
            out = torch.zeros_like(V)
            for t in self.terms:
                self._apply(t, self._partial(t, V), out)
            for f in self.fallback:
                self._fallback_apply(f, self._fallback_partial(f, V), out)
        else:
            here = local_rows(self.share, V, self.Ce)
            parts = [self._partial(t, here) for t in self.terms] + [
                self._fallback_partial(f, here) for f in self.fallback
            ]
            if parts:  # W summed over every rank's samples, all terms in one all-reduce
                flat = self.share.all_reduce(torch.cat([w.reshape(-1) for w in parts]))
                parts = [w.view(part.shape) for w, part in zip(flat.split([w.numel() for w in parts]), parts)]
            out = torch.zeros_like(here)
            for t, W in zip(self.terms, parts):
                self._apply(t, W, out)
            for f, W in zip(self.fallback, parts[len(self.terms) :]):
                self._fallback_apply(f, W, out)
            out = self.share.gather_rows(out, self.Ce)
        if self.scale != 1.0:
            out *= self.scale
        self.products += V.shape[1]
        return out[:, 0] if vec else out

    def _fallback_partial(self, f: tuple[torch.Tensor | None, Any], V: torch.Tensor) -> torch.Tensor:
        J, streamed = f
        if J is not None:
            return J.T @ V
        jac, bounds = streamed
        W = None
        for s, e in bounds:
            blk = jac(s, e).T @ V[s * self.Ce : e * self.Ce]
            W = blk if W is None else W.add_(blk)
        assert W is not None  # the sample blocks cover at least one sample
        return W

    def _fallback_apply(self, f: tuple[torch.Tensor | None, Any], W: torch.Tensor, out: torch.Tensor) -> None:
        J, streamed = f
        if J is not None:
            out += J @ W
            return
        jac, bounds = streamed
        for s, e in bounds:
            out[s * self.Ce : e * self.Ce] += jac(s, e) @ W

    def _partial(self, t: _Term, V: torch.Tensor) -> torch.Tensor:
        """The term's ``W`` over the samples held here: ``D^T V``; ``sum_j g_j (v_j z_j)^T`` per group; the
        embedding table's scatter-add."""
        P, Ce, b, dt = self.rows, self.Ce, V.shape[1], self.dtype
        Vs = V.view(P, Ce, b)
        if isinstance(t, _Grad):
            return t.D.reshape(P * Ce, -1).T @ V
        if isinstance(t, _Pairs):
            _, _, K, g, n = t.G.shape
            d = t.Z.shape[-1]
            # W_grp = sum_{i,c,k} g_ick (v_icb z_ik)^T: one GEMM (n x rows) @ (rows x b d) per block and group
            rows = _block_rows(P, Ce * K * (n + 2 * b * d) + K * d, 8, self.settings)
            W = torch.zeros(g, n, b * d, dtype=dt, device=V.device)
            for s in range(0, P, rows):
                G, Z = t.G[s : s + rows].to(dt), t.Z[s : s + rows].to(dt)
                ZV = Z[:, None, :, :, None, :] * Vs[s : s + rows, :, None, None, :, None]  # (r, Ce, K, g, b, d)
                for j in range(g):
                    W[j] += G[:, :, :, j].reshape(-1, n).T @ ZV[:, :, :, j].reshape(-1, b * d)
            return W
        _, _, K, d = t.G.shape
        rows = _block_rows(P, K * (2 * d * b + Ce * d), 8, self.settings)
        W = torch.zeros(t.V, d * b, dtype=dt, device=V.device)
        for s in range(0, P, rows):
            G = t.G[s : s + rows].to(dt)
            Gv = torch.einsum("rckd,rcb->rkdb", G, Vs[s : s + rows])
            W.index_add_(0, t.T[s : s + rows].reshape(-1), Gv.reshape(-1, d * b))
        return W

    def _apply(self, t: _Term, W: torch.Tensor, out: torch.Tensor) -> None:
        """``out += `` the term's ``Theta V`` rows of the samples held here, from its (summed) ``W``."""
        P, Ce, b, dt = self.rows, self.Ce, out.shape[1], self.dtype
        outs = out.view(P, Ce, b)
        if isinstance(t, _Grad):
            out += t.D.reshape(P * Ce, -1) @ W
            return
        if isinstance(t, _Pairs):
            _, _, K, g, n = t.G.shape
            d = t.Z.shape[-1]
            # (Theta v)_icb = sum_k (g_ick^T W_b) . z_ik: a GEMM (rows x n) @ (n x b d), then a dot over d
            rows = _block_rows(P, Ce * K * (n + 2 * b * d) + K * d, 8, self.settings)
            for s in range(0, P, rows):
                G, Z = t.G[s : s + rows].to(dt), t.Z[s : s + rows].to(dt)
                r = G.shape[0]
                for j in range(g):
                    GW = (G[:, :, :, j].reshape(-1, n) @ W[j]).view(r, Ce, K, b, d)
                    outs[s : s + rows] += torch.einsum("rckbd,rkd->rcb", GW, Z[:, :, j])
            return
        _, _, K, d = t.G.shape
        rows = _block_rows(P, K * (2 * d * b + Ce * d), 8, self.settings)
        for s in range(0, P, rows):
            G, T = t.G[s : s + rows].to(dt), t.T[s : s + rows]
            outs[s : s + rows] += torch.einsum("rckd,rkdb->rcb", G, W[T].view(T.shape[0], K, d, b))

    def diagonal(self) -> torch.Tensor:
        """``Theta_ii`` exactly: the squared norms of the per-sample gradients.

        Returns:
            ``n`` values in the operator's dtype.
        """
        P, Ce, dt = self.rows, self.Ce, self.dtype
        diag = torch.zeros(P, Ce, dtype=dt, device=self.device)
        for t in self.terms:
            if isinstance(t, _Grad):
                diag += t.D.to(dt).pow(2).sum(-1)
            elif isinstance(t, _Pairs):
                _, _, K, g, n = t.G.shape
                rows = _block_rows(P, K * K * g * (Ce + 1) + Ce * K * g * n, 8, self.settings)
                for s in range(0, P, rows):
                    G, Z = t.G[s : s + rows].to(dt), t.Z[s : s + rows].to(dt)
                    gg = torch.einsum("rckgn,rclgn->rcgkl", G, G)
                    zz = torch.einsum("rkgd,rlgd->rgkl", Z, Z)
                    diag[s : s + rows] += (gg * zz[:, None]).sum(dim=(2, 3, 4))
            else:
                _, _, K, d = t.G.shape
                rows = _block_rows(P, K * K * (Ce + 1) + Ce * K * d, 8, self.settings)
                for s in range(0, P, rows):
                    G, T = t.G[s : s + rows].to(dt), t.T[s : s + rows]
                    gg = torch.einsum("rckd,rcld->rckl", G, G)
                    diag[s : s + rows] += (gg * (T[:, :, None] == T[:, None, :])[:, None].to(dt)).sum(dim=(2, 3))
        diag = diag.reshape(-1)
        for J, streamed in self.fallback:
            if J is not None:
                diag += J.pow(2).sum(1)
                continue
            jac, bounds = streamed
            for s, e in bounds:
                diag[s * Ce : e * Ce] += jac(s, e).pow(2).sum(1)
        if self.share is not None:
            diag = self.share.gather_rows(diag, Ce)
        return diag * self.scale

    def trace(self) -> torch.Tensor:
        """``tr Theta = sum_i ||J(x_i)||^2``, exact, without the kernel.

        Returns:
            A 0-d tensor in the operator's dtype.
        """
        return self.diagonal().sum()

    def dense(self, block: int = 1024) -> torch.Tensor:
        """The ``n x n`` kernel by products with blocks of the identity (tests, small ``n``).

        Args:
            block: columns of the identity per product.

        Returns:
            The symmetric ``n x n`` kernel in the operator's dtype.
        """
        n = self.shape[0]
        cols = [
            self.matmat(torch.eye(n, dtype=self.dtype, device=self.device)[:, s : s + block])
            for s in range(0, n, block)
        ]
        K = torch.cat(cols, dim=1)
        return (K + K.T) / 2
