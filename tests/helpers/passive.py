"""A passive probe for tests of what ``observe`` receives."""

from __future__ import annotations

import probes


class InputsKept(probes.Probe):
    """A passive probe that keeps a copy of every site's input (``pre``), with the site's name, in call order."""

    name = "inputs_kept"
    passive = True
    every = 1
    needs = probes.Needs(sites=frozenset({"pre"}))

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.kept: list = []

    def observe(self, site, pre, post) -> None:
        self.kept.append((site.name, pre.detach().clone()))

    def flush(self, step) -> list:
        return []
