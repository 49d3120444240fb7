"""``relu_zeros``: exactly-zero outputs of ReLU-family sites on the training forwards, per site and window: zero
counts and fractions, units dead in the window, each unit's activity frequency (seed 003).

A passive probe: its counts stay on the device as declared state (``add_state``). What it measures, its tags,
options and cost: ``docs/probes/relu_zeros.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from probes.engine.failures import ProbesNoticeWarning, say
from probes.functional.relu_zeros import unit_axis, zero_counts
from probes.options import MAX_BINS, choice, integer, option
from probes.probe import Needs, Probe, Site
from probes.records import Histogram, Record, Scalar


def _notice(message: str) -> None:
    say(message, ProbesNoticeWarning)  # once, pointing at the user's line


#: per site, the ``post != 0`` tensors of up to this many elements (over forwards) are held, then summed at once
STASH_MAX_ELEMENTS = 1 << 22
#: and at most this many forwards of them
STASH_MAX_FORWARDS = 32
#: activations of at least this many elements are added into one byte tensor per forward instead (less copying)
BYTES_MIN_ELEMENTS = 1 << 16


class _Stash:
    """Per site, the ``post != 0`` tests of the last forwards, summed per unit into the window's counts at a fold
    (every ``limit`` forwards, at a flush, or when the site's shape changes). Small activations: the tests are held
    (one kernel per forward) and stacked at the fold; large ones are added into one byte tensor (two kernels per
    forward, no copies), folded every 255 forwards."""

    __slots__ = ("bools", "bytes", "count", "dims", "shape", "device", "limit", "units")

    def __init__(self, post: torch.Tensor, dims: tuple[int, ...], units: int) -> None:
        self.bools: list[torch.Tensor] = []
        self.bytes: torch.Tensor | None = None
        self.count = 0
        self.dims = dims  # the axes to sum over (all but the unit axis)
        self.shape, self.device, self.units = post.shape, post.device, units
        large = post.numel() >= BYTES_MIN_ELEMENTS
        self.limit = 255 if large else max(1, min(STASH_MAX_FORWARDS, STASH_MAX_ELEMENTS // max(1, post.numel())))
        if large:
            self.bytes = torch.zeros(post.shape, dtype=torch.uint8, device=post.device)


class ReluZeros(Probe):
    """Counts exactly-zero ReLU outputs per site on training forwards (on device, one sync per flush)."""

    name = "relu_zeros"
    description = "ReLU outputs that are exactly zero in training, per layer; dead units"
    every = 100
    passive = True
    # the outputs only: the capture keeps no site input for it
    needs = Needs(sites=frozenset({"post"}), probe_data=False)

    @dataclass(frozen=True)
    class Options:
        unit_dim: int | None = option(
            None, integer, optional=True, what="None or an int axis", doc="the axis of units (default: channels)"
        )
        sites: str = option("relu", choice, allowed=("relu", "all"), doc="ReLU-family sites, or every activation")
        bins: int = option(20, integer, minimum=1, maximum=MAX_BINS, doc="bins of the unit-activity histogram")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.add_state("nonzero", {}, reduce="sum")  # site -> (units,) int64: outputs != 0 per unit
        self.add_state("outputs", {}, reduce="sum")  # site -> number of outputs seen (python int: from shapes)
        self.add_state("per_unit", {}, reduce="sum")  # site -> outputs per unit
        self._stash: dict[str, _Stash] = {}
        self._units: dict[str, tuple[int, int]] = {}  # site -> (unit axis, number of units)

    def wants(self, site: Site) -> bool:
        # "all": every activation site, not the extra module types that active probes asked the capture for
        return site.relu_family or (self.options.sites == "all" and not site.extra)

    def _unit_dim(self, site: str, ndim: int) -> int:
        axis, fits = unit_axis(ndim, self.options.unit_dim)
        if not fits:
            _notice(
                f"relu_zeros: option 'unit_dim'={self.options.unit_dim} is out of range for the {ndim}-d activations "
                f"of site {site!r}; that site counts its units on axis {axis} (the default)"
            )
        return axis

    def observe(self, site: Site, pre: torch.Tensor | None, post: torch.Tensor) -> None:
        name = site.name
        stash = self._stash.get(name)
        if stash is not None and post.shape == stash.shape and post.device == stash.device:  # the hot path
            self._count(name, stash, post)
            return
        self._observe_first(name, post)

    def _count(self, name: str, stash: _Stash, post: torch.Tensor) -> None:
        nz = post.bool()  # the "!= 0" test (NaN counts as non-zero, -0.0 as zero)
        if stash.bytes is not None:
            stash.bytes += nz
        else:
            stash.bools.append(nz)
        stash.count += 1
        if stash.count >= stash.limit:
            self._fold(name, keep=True)
        n = post.numel()
        self.outputs[name] += n
        self.per_unit[name] += n // stash.units

    def _observe_first(self, name: str, post: torch.Tensor) -> None:
        """A site's first forward in the window, or one whose shape or device changed: checks, then a new stash."""
        known = self._units.get(name)
        if known is None:
            if post.ndim == 0:
                raise ValueError(f"relu_zeros: site {name!r} produced a 0-d tensor; nothing to count")
            axis = self._unit_dim(name, post.ndim)
            known = self._units[name] = (axis, post.shape[axis])
        axis, units = known
        if post.ndim <= axis or post.shape[axis] != units:
            raise ValueError(
                f"relu_zeros: site {name!r} changed its number of units from {units} to "
                f"{post.shape[axis] if post.ndim > axis else 'none'}"
            )
        self._fold(name)
        nonzero = self.nonzero.get(name)
        if nonzero is None:
            self.nonzero[name] = torch.zeros(units, dtype=torch.int64, device=post.device)
            self.outputs[name], self.per_unit[name] = 0, 0
        elif nonzero.device != post.device:  # the model moved within the window (or state came from elsewhere)
            self.nonzero[name] = nonzero.to(post.device)
        stash = self._stash[name] = _Stash(post, tuple(d for d in range(post.ndim) if d != axis), units)
        self._count(name, stash, post)

    def _fold(self, name: str, keep: bool = False) -> None:
        """Sum the stashed tests into the counts (``keep``: the stash stays for the next forwards)."""
        stash = self._stash.get(name) if keep else self._stash.pop(name, None)
        if stash is None or stash.count == 0:
            return
        if stash.bytes is not None:
            total = stash.bytes
        else:  # at most 32 forwards: a sum in bytes, then one reduction per unit
            total = torch.stack(stash.bools).view(torch.uint8).sum(0, dtype=torch.uint8)
        self.nonzero[name] += total.sum(stash.dims, dtype=torch.int64) if stash.dims else total.to(torch.int64)
        stash.bools, stash.count = [], 0
        if stash.bytes is not None and keep:
            stash.bytes.zero_()

    def settle(self) -> None:
        for name in list(self._stash):
            self._fold(name)

    def reset_window(self) -> None:
        super().reset_window()
        self._stash = {}

    def flush(self, step: int) -> list[Record]:
        records: list[Record] = []
        zeros_all, outputs_all = [], []
        for name, nonzero in self.nonzero.items():
            outputs, per_unit = self.outputs[name], self.per_unit[name]
            if outputs == 0:
                continue
            counts = zero_counts(nonzero, outputs, per_unit)
            zeros_all.append(counts.zeros)
            outputs_all.append(float(outputs))
            records += [
                Scalar(f"relu_zeros/{name}/fraction", counts.fraction),
                Scalar(f"relu_zeros/{name}/zeros", counts.zeros),
                Scalar(f"relu_zeros/{name}/dead_in_window", counts.dead),
                Histogram.of(f"relu_zeros/{name}/unit_activity", counts.activity, bins=self.options.bins),
            ]
        if zeros_all:
            records.insert(0, Scalar("relu_zeros/total/fraction", torch.stack(zeros_all).sum() / sum(outputs_all)))
        return records
