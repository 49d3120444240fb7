"""Keeps records in memory: for tests and notebooks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import cast

from probes.records import Histogram, Image, Record, Scalar
from probes.sinks.base import Sink


class MemorySink(Sink):
    """``records`` is the list of everything written (steps filled in, values on the host);
    ``scalars()`` gives ``{tag: [(step, value), ...]}``.

    An image is kept as the probe returned it: its picture data (``probes.records.Matrix``, ``Trails``, ...), drawn
    by the default renderer only when its ``pixels`` are first read (once, shared with the other sinks; the
    TensorBoard sink's pixels when it drew them first), so keeping images costs training nothing.
    """

    def __init__(self) -> None:
        self.records: list[Record] = []

    def write(self, records: Sequence[Record], step: int) -> None:
        for r in records:
            if isinstance(r, Scalar):
                r = dataclasses.replace(r, value=r.item(), step=step)
            elif isinstance(r, Histogram):
                r = dataclasses.replace(
                    r,
                    **{
                        f.name: getattr(r, f.name).detach().cpu()
                        for f in dataclasses.fields(r)
                        if f.name not in ("tag", "step")
                    },
                    step=step,
                )
            elif isinstance(r, Image):
                r = r.at(step)
            else:
                r = dataclasses.replace(r, step=step)
            self.records.append(r)

    def scalars(self) -> dict[str, list[tuple[int, float]]]:
        out: dict[str, list[tuple[int, float]]] = {}
        for r in self.records:
            if isinstance(r, Scalar):
                # as ``write`` keeps it: stamped with the step, the value a float
                out.setdefault(r.tag, []).append((cast(int, r.step), cast(float, r.value)))
        return out

    def last(self, tag: str) -> float:
        """The last value written under a scalar tag."""
        series = self.scalars().get(tag)
        if not series:
            raise KeyError(f"no scalar {tag!r}; tags: {sorted(self.scalars())}")
        return series[-1][1]

    def histograms(self) -> dict[str, list[Histogram]]:
        out: dict[str, list[Histogram]] = {}
        for r in self.records:
            if isinstance(r, Histogram):
                out.setdefault(r.tag, []).append(r)
        return out

    def images(self) -> dict[str, list[Image]]:
        """``{tag: [Image, ...]}``; ``image.figure`` is the picture data, drawn when ``image.pixels`` is read."""
        out: dict[str, list[Image]] = {}
        for r in self.records:
            if isinstance(r, Image):
                out.setdefault(r.tag, []).append(r)
        return out

    def tags(self) -> set[str]:
        return {r.tag for r in self.records}
