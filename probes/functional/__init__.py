"""Pure mathematics behind the probes: tensors in, tensors out; no hooks, no collectives, no files, never the engine.

Kernels and their spectra (``cka``, ``spectrum``, ``top_eigenvalues``, ...), the path gram of gated networks
(``factorize``, ``quadratic_form``, ...), activation patterns and ``L_gen`` of linear regions, label matrices,
mean-field networks, the forces of the margin probe and the bit packing of gate patterns. One module per probe,
named like it (``alignment``, ``pathgram``, ``ntk``, ``patterns``, ``margin``, ``linear_region``, ``particles``,
``relu_zeros``), with ``labels`` and ``spectra``. Everything is importable from here, as in
``torchmetrics.functional``::

    from probes.functional import cka, spectrum

What needs the model itself (``empirical_ntk``, ``ntk_operator``, ``local_affine_map``, ...) is
``probes.autodiff``; snapshot files are ``probes.snapshots``. Two functions share their module's name and are
reached through it: ``probes.functional.alignment.alignment`` (centered kernel alignment) and
``probes.functional.pathgram.path_gram`` (the neural path kernel). Importing this package imports torch and numpy
and nothing else beyond the standard library.
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
from probes.functional.linear_region import (
    LocalAffineMap,
    NotPiecewiseLinearError,
    flip_rate,
    l_gen,
    patterns_differ,
)
from probes.functional.margin import forces
from probes.functional.ntk.kernel import trace_over_outputs
from probes.functional.ntk.settings import NTKSettings
from probes.functional.particles import MeanField, principal_plane, sphere_
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
from probes.functional.patterns import distinct_rows, pack_rows
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
    # the NTK's pure side (the kernel of a model: probes.autodiff.ntk)
    "trace_over_outputs",
    "NTKSettings",
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
    # linear regions (the local affine map of a model: probes.autodiff.linear_region)
    "patterns_differ",
    "flip_rate",
    "l_gen",
    "LocalAffineMap",
    "NotPiecewiseLinearError",
    # labels, margin forces, mean-field networks, gate bits
    "label_matrix",
    "forces",
    "MeanField",
    "sphere_",
    "principal_plane",
    "pack_rows",
    "distinct_rows",
]
