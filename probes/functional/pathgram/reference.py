"""Brute-force path enumeration: the reference the tests compare the path gram with.

Lakshminarayanan & Singh 2020, "Neural path features and neural path kernel": a Linear->gate chain with 0/1 gates
``A_l`` writes its output as a sum over input-to-output paths ``p``::

    f(x) = sum_p phi_p(x) v_p,        H = Phi Phi^T,

``phi_p(x)`` the input coordinate the path starts from (1 for a path starting at a bias) times the gates it
crosses, ``v_p`` the product of the weights along it. ``enumerate_paths`` lists every path one by one, with no
use of the closed form of ``kernel.path_gram``; it is exponential in depth, for small chains only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import cast

import numpy as np


def enumerate_paths(
    x: np.ndarray, gates: Sequence[np.ndarray], weights: Sequence[np.ndarray], biases: Sequence[np.ndarray | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Every input-to-output path of a Linear->gate chain, listed one by one (a reference for tests).

    A path starts at an input coordinate ``i`` or at a unit ``j`` of a layer whose Linear has a bias, visits one
    unit per later hidden layer, and ends at the output layer (a path's value is a vector over the C outputs; the
    output bias is one path of length zero).

    Args:
        x: P x d inputs.
        gates: ``gates[l]`` the P x n_{l+1} 0/1 gates of hidden layer ``l + 1``.
        weights: ``weights[k]`` the ``out x in`` matrix of Linear ``k+1``.
        biases: ``biases[k]`` the bias of Linear ``k+1``, or None.

    Returns:
        ``(Phi, V)``: ``Phi`` (P x #paths: the start value ``x_i`` or 1 times the gates crossed) and ``V``
        (#paths x C: the product of the weights along the path, times the bias for bias paths), so that
        ``Phi @ V`` is the network output and ``Phi @ Phi.T`` the path gram.
    """
    P, d = x.shape
    L = len(weights)
    widths = [w.shape[0] for w in weights]  # out sizes: n_1 .. n_{L-1}, C
    C = widths[-1]
    phis: list[np.ndarray] = []
    values: list[np.ndarray] = []
    # start layer 0 = inputs; start layer k >= 1 = the bias of Linear k (units of layer k, or outputs if k == L)
    for start in range(L + 1):
        if start > 0 and biases[start - 1] is None:
            continue
        hidden_from = max(start, 1)  # hidden layers visited: hidden_from .. L-1
        start_units = range(d) if start == 0 else range(widths[start - 1])
        if start == L:  # the output bias: one path of length zero, its value the bias vector
            phis.append(np.ones(P))
            values.append(np.asarray(biases[L - 1], dtype=np.float64).copy())
            continue
        later = [range(widths[l - 1]) for l in range(start + 1, L)]  # hidden layers after the start
        for s in start_units:
            for rest in itertools.product(*later):
                units = (s, *rest) if start > 0 else rest  # unit per hidden layer from hidden_from
                phi = x[:, s].astype(np.float64).copy() if start == 0 else np.ones(P)
                # a start layer k >= 1 has a bias (the others were skipped above)
                val = 1.0 if start == 0 else float(cast(np.ndarray, biases[start - 1])[s])
                prev = s
                for offset, j in enumerate(units):
                    layer = hidden_from + offset  # hidden layer index (1-based)
                    phi = phi * gates[layer - 1][:, j]
                    if not (start > 0 and offset == 0):  # the bias path starts at unit j: no weight into it
                        val *= float(weights[layer - 1][j, prev])
                    prev = j
                v = np.array([val * float(weights[L - 1][o, prev]) for o in range(C)])
                phis.append(phi)
                values.append(v)
    return np.stack(phis, axis=1), np.stack(values, axis=0)
