"""Path-gram mathematics (seed 000; Lakshminarayanan & Singh 2020, "Neural path features and neural path kernel").

A fully connected chain ``x -> Linear_1 -> gate_1 -> ... -> gate_{L-1} -> Linear_L`` with 0/1 gate matrices
``A_l`` (``P x n_l``, ``A_l[i, j] = 1`` when unit ``j`` of hidden layer ``l`` is open for sample ``i``) writes its
output as a sum over input-to-output paths, ``f(x) = sum_p phi_p(x) v_p``: ``phi_p(x)`` is the input coordinate
the path starts from (1 for a path starting at a bias) times the product of the gates it crosses, and ``v_p`` the
product of the weights along it. The neural path kernel ``H = Phi Phi^T`` is::

    bias-free:   H = (X X^T) * prod_l lambda_l,      lambda_l = A_l A_l^T   (elementwise products)
    with biases: S_0 = X X^T,  S_l = (S_{l-1} + b_l) * lambda_l,  H = S_{L-1} + b_L,

``b_k = 1`` when Linear ``k`` has a bias (the bias of layer ``k`` starts paths at layer ``k``), else 0.
``path_gram`` returns ``H = 2^e h`` (rescaled by exact powers of two, finite at any depth) in one P x P float64
buffer; ``factorize`` overwrites its lower triangle with the Cholesky factor of ``M = H + delta mean(diag H) I``
(``delta = 0`` unless ``H`` is numerically singular) and judges the condition of ``M``; ``quadratic_form`` gives
``q = tr(Y^T M^{-1} Y)``.

Modules, one concern each:

- ``layout``: ``PathGram`` (the three layouts of the buffer and the blockwise reads of each) and
  ``Factorization``;
- ``kernel``: the products, ``path_gram``, ``gram``, ``gate_gram``, ``input_gram``, ``row_blocks``,
  ``Workspace``;
- ``solve``: ``factorize`` (in place, with jitter), ``cholesky_in_place``, ``cholesky_jitter``,
  ``quadratic_form``;
- ``condition``: block Lanczos bounds of the extreme eigenvalues, ``condition_estimate``, ``condition_exact``;
- ``reference``: ``enumerate_paths``, every path listed one by one (the brute-force reference of the tests).

Every name is importable from this package, and setting one here (``monkeypatch.setattr``) sets it in the
modules that read it, as when this package was one module.
"""

from __future__ import annotations

import sys
import types

from probes.functional.pathgram import condition, kernel, layout, reference, solve
from probes.functional.pathgram.condition import condition_estimate as condition_estimate
from probes.functional.pathgram.condition import condition_exact as condition_exact
from probes.functional.pathgram.kernel import EXACT_FLOAT32 as EXACT_FLOAT32
from probes.functional.pathgram.kernel import Workspace as Workspace
from probes.functional.pathgram.kernel import gate_gram as gate_gram
from probes.functional.pathgram.kernel import gram as gram
from probes.functional.pathgram.kernel import input_gram as input_gram
from probes.functional.pathgram.kernel import path_gram as path_gram
from probes.functional.pathgram.kernel import row_blocks as row_blocks
from probes.functional.pathgram.layout import CHUNK as CHUNK
from probes.functional.pathgram.layout import Factorization as Factorization
from probes.functional.pathgram.layout import PathGram as PathGram
from probes.functional.pathgram.layout import chunks as chunks
from probes.functional.pathgram.reference import enumerate_paths as enumerate_paths
from probes.functional.pathgram.solve import CHOLESKY_BLOCK as CHOLESKY_BLOCK
from probes.functional.pathgram.solve import cholesky_in_place as cholesky_in_place
from probes.functional.pathgram.solve import cholesky_jitter as cholesky_jitter
from probes.functional.pathgram.solve import factorize as factorize
from probes.functional.pathgram.solve import quadratic_form as quadratic_form

_MODULES = (layout, kernel, condition, solve, reference)
_UNSET = object()


class _Package(types.ModuleType):
    """This package, where setting a name also rebinds it in each module of the package that holds the same object:
    ``monkeypatch.setattr(path_gram, "cholesky_in_place", f)`` reaches ``factorize``, which reads it at call
    time."""

    def __setattr__(self, name: str, value: object) -> None:
        old = self.__dict__.get(name, _UNSET)
        if old is not _UNSET and not isinstance(old, types.ModuleType):
            for module in _MODULES:
                if module.__dict__.get(name, _UNSET) is old:
                    setattr(module, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
