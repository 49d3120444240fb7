"""Built-in probes, one module each, named like the probe. They register through the same hook as third parties."""

from __future__ import annotations

from probes.builtin.alignment import Alignment
from probes.builtin.grad_noise import GradNoise
from probes.builtin.hessian import Hessian
from probes.builtin.linear_region import LinearRegion
from probes.builtin.margin import Margin
from probes.builtin.ntk import NTK
from probes.builtin.particles import Particles
from probes.builtin.pathgram import PathGramProbe
from probes.builtin.patterns import Patterns
from probes.builtin.relu_zeros import ReluZeros
from probes.hookspecs import hookimpl
from probes.probe import Probe

BUILTIN_PROBES: list[type[Probe]] = [
    Alignment,
    GradNoise,
    Hessian,
    LinearRegion,
    Margin,
    NTK,
    Particles,
    PathGramProbe,
    Patterns,
    ReluZeros,
]


@hookimpl
def probes_add_probes() -> list[type[Probe]]:
    return list(BUILTIN_PROBES)
