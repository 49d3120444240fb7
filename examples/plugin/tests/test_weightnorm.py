"""The plugin's own tests: the harness every probe runs (``probes.testing``)."""

from probes_weightnorm import WeightNorm

from probes import testing


def test_weightnorm_passes_the_probes_harness():
    testing.check_probe(WeightNorm)
