"""Kernel toolbox under its former name: centered alignment, CKA, the empirical NTK, spectra.

The code lives in ``probes.functional`` (``alignment``, ``spectra``) and ``probes.autodiff.ntk``; this module keeps
``probes.kernels.cka`` and friends importable.
"""

from probes.autodiff.ntk import SampleMixingError, empirical_ntk, ntk_plan
from probes.functional.alignment import *  # noqa: F403
from probes.functional.alignment import __all__ as _alignment_all
from probes.functional.spectra import (
    Spectrum,
    condition_number,
    effective_rank,
    kernel_distance,
    label_alignment,
    spectrum,
)

__all__ = [
    *_alignment_all,
    "empirical_ntk",
    "ntk_plan",
    "SampleMixingError",
    "Spectrum",
    "spectrum",
    "condition_number",
    "effective_rank",
    "kernel_distance",
    "label_alignment",
]
