"""``relu_zeros``: exactly-zero outputs of ReLU-family sites on the training forwards (seed 003).

Per site and window (the steps between two flushes): ``zeros`` (count of outputs == 0),
``fraction = zeros / outputs``, ``dead_in_window`` (units never non-zero in the window), and a
histogram of each unit's activity frequency (fraction of its outputs that are non-zero);
``relu_zeros/total/fraction`` over all observed sites. A unit is a feature (last dim) of a
2-D or 3-D (sequence) activation and a channel (dim 1) of a 4-D/5-D one; ``unit_dim`` overrides.
Counting stays on the device: per site and forward one ``!= 0`` test added as bytes into a stash
(reduced every 255 forwards), one host copy per flush. The counts are declared state
(``add_state``): the session resets them per window, sums them over ranks and checkpoints them.

Tags: ``relu_zeros/<site>/fraction``, ``relu_zeros/<site>/zeros``, ``relu_zeros/<site>/dead_in_window``
(units never non-zero over the training forwards of the window; compare ``patterns/<site>/dead_on_probe_batch``,
which is over the probe batch), histogram ``relu_zeros/<site>/unit_activity``, ``relu_zeros/total/fraction``.
"""

from __future__ import annotations

import torch

from probes import options
from probes.probe import Probe, Site
from probes.records import Histogram, Record, Scalar

#: activations up to this many elements are stashed as bytes and reduced every <= 255 forwards
STASH_MAX_ELEMENTS = 1 << 22


class _Stash:
    """Per-site cache of ``post != 0`` bytes, added elementwise each forward and folded every <= 255 forwards."""

    __slots__ = ("bytes", "count", "dims")

    def __init__(self, dims: tuple[int, ...]) -> None:
        self.bytes: torch.Tensor | None = None
        self.count = 0
        self.dims = dims


class ReluZeros(Probe):
    """Counts exactly-zero ReLU outputs per site on training forwards (on device, one sync per flush)."""

    name = "relu_zeros"
    description = "ReLU outputs that are exactly zero in training, per layer; dead units"
    every = 100
    passive = True
    needs_probe_data = False

    def __init__(self, unit_dim: int | None = None, sites: str = "relu", bins: int = 20) -> None:
        options.choice("relu_zeros", "sites", sites, ("relu", "all"))
        options.integer("relu_zeros", "unit_dim", unit_dim, optional=True, what="None or an int axis")
        options.integer("relu_zeros", "bins", bins, minimum=1)
        self.unit_dim = None if unit_dim is None else int(unit_dim)
        self.sites = sites
        self.bins = int(bins)
        self.add_state("nonzero", {}, reduce="sum")  # site -> (units,) int64: outputs != 0 per unit
        self.add_state("outputs", {}, reduce="sum")  # site -> number of outputs seen (python int: from shapes)
        self.add_state("per_unit", {}, reduce="sum")  # site -> outputs per unit
        self._stash: dict[str, _Stash] = {}
        self._units: dict[str, tuple[int, int]] = {}  # site -> (unit axis, number of units)

    def wants(self, site: Site) -> bool:
        # "all": every activation site, not the extra module types that active probes asked the capture for
        return site.relu_family or (self.sites == "all" and not site.extra)

    def _unit_dim(self, site: str, ndim: int) -> int:
        if self.unit_dim is not None:
            if not -ndim <= self.unit_dim < ndim:
                raise ValueError(f"relu_zeros: option 'unit_dim'={self.unit_dim} is out of range for the "
                                 f"{ndim}-d activations of site {site!r}")
            return self.unit_dim % ndim
        if ndim <= 1:
            return 0
        return ndim - 1 if ndim <= 3 else 1

    def observe(self, site: Site, pre: torch.Tensor, post: torch.Tensor) -> None:
        name = site.name
        known = self._units.get(name)
        if known is None:
            if post.ndim == 0:
                raise ValueError(f"relu_zeros: site {name!r} produced a 0-d tensor; nothing to count")
            axis = self._unit_dim(name, post.ndim)
            known = self._units[name] = (axis, post.shape[axis])
        axis, units = known
        if post.ndim <= axis or post.shape[axis] != units:
            raise ValueError(f"relu_zeros: site {name!r} changed its number of units from {units} to "
                             f"{post.shape[axis] if post.ndim > axis else 'none'}")
        nonzero = self.nonzero.get(name)
        if nonzero is None:
            nonzero = self.nonzero[name] = torch.zeros(units, dtype=torch.int64, device=post.device)
            self.outputs[name], self.per_unit[name] = 0, 0
        elif nonzero.device != post.device:  # the model moved within the window (or state came from elsewhere)
            self._fold(name)
            nonzero = self.nonzero[name] = self.nonzero[name].to(post.device)
        dims = tuple(d for d in range(post.ndim) if d != axis)
        nz = post.detach().bool()  # the "!= 0" test (NaN counts as non-zero, -0.0 as zero)
        if not dims:
            nonzero += nz
        elif post.numel() > STASH_MAX_ELEMENTS:
            nonzero += nz.view(torch.uint8).sum(dims, dtype=torch.int64)
        else:
            stash = self._stash.get(name)
            if stash is not None and stash.bytes is not None and (stash.bytes.shape != nz.shape or stash.count == 255):
                self._fold(name)
                stash = None
            if stash is None or stash.bytes is None:
                stash = self._stash[name] = _Stash(dims)
                stash.bytes = nz.to(torch.uint8)
            else:
                stash.bytes += nz.view(torch.uint8)
            stash.count += 1
        n = post.numel()
        self.outputs[name] += n
        self.per_unit[name] += n // units

    def _fold(self, name: str) -> None:
        stash = self._stash.pop(name, None)
        if stash is not None and stash.bytes is not None:
            self.nonzero[name] += stash.bytes.sum(stash.dims, dtype=torch.int64)

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
            zeros = outputs - nonzero.sum().double()
            zeros_all.append(zeros)
            outputs_all.append(float(outputs))
            records += [
                Scalar(f"relu_zeros/{name}/fraction", zeros / outputs),
                Scalar(f"relu_zeros/{name}/zeros", zeros),
                Scalar(f"relu_zeros/{name}/dead_in_window", (nonzero == 0).sum()),
                Histogram.of(f"relu_zeros/{name}/unit_activity", nonzero.double() / per_unit, bins=self.bins),
            ]
        if zeros_all:
            records.insert(0, Scalar("relu_zeros/total/fraction", torch.stack(zeros_all).sum() / sum(outputs_all)))
        return records
