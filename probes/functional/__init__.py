"""Pure mathematics behind the probes: tensors in, tensors out, no hooks, no session, never the engine.

Kernels and their spectra (``cka``, ``empirical_ntk``, ``spectrum``, ``top_eigenvalues``, ...), the path gram of
gated networks (``factorize``, ``quadratic_form``, ...), local affine maps of piecewise-linear networks,
label matrices, mean-field networks and gate snapshots. Everything is importable from here, as in
``torchmetrics.functional``::

    from probes.functional import cka, empirical_ntk, spectrum

Two functions share their module's name and are reached through it: ``probes.functional.alignment.alignment``
(centered kernel alignment) and ``probes.functional.pathgram.path_gram`` (the neural path kernel).
Importing this package imports torch and numpy and nothing else beyond the standard library.
"""

from __future__ import annotations

from probes.functional.alignment import (
    DegenerateKernelError,
    StreamingCKA,
    as_features,
    center,
    center_features,
    cka,
    hsic,
    linear_hsic,
    minibatch_cka,
)
from probes.functional.labels import label_matrix
from probes.autodiff.linear_region import (
    LocalAffineMap,
    NotPiecewiseLinearError,
    check_piecewise_linear,
    local_affine_map,
)
from probes.functional.particles import MeanField, sphere_
from probes.autodiff.ntk import (
    NTKCost,
    NTKOperator,
    NTKPlan,
    SampleMixingError,
    empirical_ntk,
    ntk_cost,
    ntk_operator,
    ntk_plan,
    trace_over_outputs,
    verify_plan,
)
from probes.functional.pathgram import (
    Factorization,
    PathGram,
    cholesky_jitter,
    condition_estimate,
    condition_exact,
    enumerate_paths,
    factorize,
    quadratic_form,
)
from probes.functional.patterns import GateSnapshot, list_snapshots, load_all, load_gates, save_gates
from probes.functional.spectra import (
    Spectrum,
    TopEigen,
    condition_number,
    effective_rank,
    effective_rank_bounds,
    eigenvalues,
    kernel_distance,
    label_alignment,
    spectrum,
    top_eigenvalues,
)

__all__ = [
    # kernel alignment and CKA (alignment itself: probes.functional.alignment.alignment)
    "cka",
    "linear_hsic",
    "hsic",
    "center",
    "center_features",
    "minibatch_cka",
    "StreamingCKA",
    "as_features",
    "DegenerateKernelError",
    # the empirical NTK
    "empirical_ntk",
    "ntk_operator",
    "ntk_plan",
    "ntk_cost",
    "verify_plan",
    "trace_over_outputs",
    "NTKOperator",
    "NTKPlan",
    "NTKCost",
    "SampleMixingError",
    # spectra
    "spectrum",
    "eigenvalues",
    "effective_rank",
    "condition_number",
    "label_alignment",
    "kernel_distance",
    "top_eigenvalues",
    "effective_rank_bounds",
    "Spectrum",
    "TopEigen",
    # the path gram (the kernel itself: probes.functional.pathgram.path_gram)
    "factorize",
    "quadratic_form",
    "condition_estimate",
    "condition_exact",
    "cholesky_jitter",
    "enumerate_paths",
    "PathGram",
    "Factorization",
    # local affine maps
    "local_affine_map",
    "check_piecewise_linear",
    "LocalAffineMap",
    "NotPiecewiseLinearError",
    # labels, mean-field networks, gate snapshots
    "label_matrix",
    "MeanField",
    "sphere_",
    "save_gates",
    "load_gates",
    "load_all",
    "list_snapshots",
    "GateSnapshot",
]
