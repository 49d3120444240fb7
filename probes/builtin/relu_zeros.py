"""``relu_zeros``: exactly-zero outputs of ReLU-family sites on the training forwards (seed 003).

Per site and window (the steps between two flushes): ``zeros`` (count of outputs == 0),
``fraction = zeros / outputs``, ``dead_units`` (units never non-zero in the window), and a
histogram of each unit's activity frequency (fraction of its outputs that are non-zero);
``relu_zeros/total/fraction`` over all observed sites. A unit is a feature (last dim) of a
2-D or 3-D (sequence) activation and a channel (dim 1) of a 4-D/5-D one; ``unit_dim`` overrides.
Counting stays on the device: per site and forward one ``!= 0`` test added as bytes into a stash
(reduced every 255 forwards), one host copy per flush.
"""

from __future__ import annotations

from typing import Any

import torch

from probes.probe import Probe, Site
from probes.records import Histogram, Record, Scalar

#: activations up to this many elements are stashed as bytes and reduced every <= 255 forwards
STASH_MAX_ELEMENTS = 1 << 22


class _Window:
    """Counts of one site over one window.

    Each forward adds ``post != 0`` as bytes into ``stash`` (one elementwise add, no reduction);
    every 255 forwards, at a change of shape, and before anything reads the counts, the stash is
    reduced into the per-unit ``nonzero`` counts. Large activations skip the stash and are reduced
    at once.
    """

    __slots__ = ("nonzero", "outputs", "per_unit", "unit_dim", "dims", "count_tensor", "stash", "stashed")

    def __init__(self, post: torch.Tensor, unit_dim: int) -> None:
        self.unit_dim = unit_dim
        self.dims = tuple(d for d in range(post.ndim) if d != unit_dim)
        self.nonzero = torch.zeros(post.shape[unit_dim], dtype=torch.int64, device=post.device)
        self.outputs = 0  # python ints: known from shapes, no sync
        self.per_unit = 0
        self.count_tensor: torch.Tensor | None = None
        self.stash: torch.Tensor | None = None
        self.stashed = 0

    def add(self, post: torch.Tensor) -> None:
        # bool() is the "!= 0" test (NaN counts as non-zero, -0.0 as zero)
        nz = post.detach().bool()
        if not self.dims:
            self.nonzero += nz
        elif post.numel() > STASH_MAX_ELEMENTS:
            self.nonzero += nz.view(torch.uint8).sum(self.dims, dtype=torch.int64)
        else:
            if self.stash is not None and (self.stash.shape != nz.shape or self.stashed == 255):
                self.fold()
            if self.stash is None:
                self.stash = nz.to(torch.uint8)
            else:
                self.stash += nz.view(torch.uint8)
            self.stashed += 1
        n = post.numel()
        self.outputs += n
        self.per_unit += n // self.nonzero.shape[0]

    def fold(self) -> None:
        """Reduce the stashed bytes into the per-unit counts."""
        if self.stash is not None:
            self.nonzero += self.stash.sum(self.dims, dtype=torch.int64)
            self.stash, self.stashed = None, 0


class ReluZeros(Probe):
    """Counts exactly-zero ReLU outputs per site on training forwards (on device, one sync per flush)."""

    name = "relu_zeros"
    description = "fraction/count of exactly-zero ReLU outputs per site, dead units, unit activity (passive)"
    every = 100
    passive = True
    needs_probe_data = False

    def __init__(self, unit_dim: int | None = None, sites: str = "relu", bins: int = 20) -> None:
        if sites not in ("relu", "all"):
            raise ValueError(f"relu_zeros: sites must be 'relu' (ReLU family) or 'all', got {sites!r}")
        self.unit_dim = unit_dim
        self.sites = sites
        self.bins = bins
        self.windows: dict[str, _Window] = {}

    def wants(self, site: Site) -> bool:
        return self.sites == "all" or site.relu_family

    def _unit_dim(self, ndim: int) -> int:
        if self.unit_dim is not None:
            return self.unit_dim % ndim
        if ndim <= 1:
            return 0
        return ndim - 1 if ndim <= 3 else 1

    def observe(self, site: Site, pre: torch.Tensor, post: torch.Tensor) -> None:
        w = self.windows.get(site.name)
        if w is None:
            if post.ndim == 0:
                raise ValueError(f"relu_zeros: site {site.name!r} produced a 0-d tensor; nothing to count")
            w = self.windows[site.name] = _Window(post, self._unit_dim(post.ndim))
        elif post.shape[w.unit_dim] != w.nonzero.shape[0]:
            raise ValueError(f"relu_zeros: site {site.name!r} changed its number of units from "
                             f"{w.nonzero.shape[0]} to {post.shape[w.unit_dim]}")
        w.add(post)

    def reducible(self) -> list[torch.Tensor]:
        out = []
        for w in self.windows.values():
            w.fold()
            w.count_tensor = torch.tensor([w.outputs, w.per_unit], dtype=torch.int64, device=w.nonzero.device)
            out += [w.nonzero, w.count_tensor]
        return out

    def flush(self, step: int) -> list[Record]:
        if not self.windows:
            return []
        records: list[Record] = []
        zeros_all, outputs_all = [], []
        for w in self.windows.values():
            w.fold()
        for name, w in self.windows.items():
            if w.count_tensor is not None:  # summed over ranks
                outputs, per_unit = w.count_tensor.double()[0], w.count_tensor.double()[1]
            else:
                outputs, per_unit = float(w.outputs), float(w.per_unit)
            if isinstance(outputs, float) and outputs == 0:
                continue
            zeros = outputs - w.nonzero.sum().double()
            zeros_all.append(zeros)
            outputs_all.append(torch.as_tensor(outputs, dtype=torch.float64, device=w.nonzero.device))
            records += [
                Scalar(f"relu_zeros/{name}/fraction", zeros / outputs),
                Scalar(f"relu_zeros/{name}/zeros", zeros),
                Scalar(f"relu_zeros/{name}/dead_units", (w.nonzero == 0).sum()),
                Histogram.of(f"relu_zeros/{name}/unit_activity", w.nonzero.double() / per_unit, bins=self.bins),
            ]
        if zeros_all:
            records.insert(0, Scalar("relu_zeros/total/fraction",
                                     torch.stack(zeros_all).sum() / torch.stack(outputs_all).sum()))
        self.windows = {}
        return records

    def state_dict(self) -> dict[str, Any]:
        for w in self.windows.values():
            w.fold()
        return {name: {"nonzero": w.nonzero.clone(), "outputs": w.outputs, "per_unit": w.per_unit,
                       "unit_dim": w.unit_dim, "ndim": len(w.dims) + 1} for name, w in self.windows.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows = {}
        for name, s in state.items():
            w = _Window.__new__(_Window)
            w.unit_dim, w.dims = s["unit_dim"], tuple(d for d in range(s["ndim"]) if d != s["unit_dim"])
            w.nonzero, w.outputs, w.per_unit, w.count_tensor = s["nonzero"].clone(), s["outputs"], s["per_unit"], None
            w.stash, w.stashed = None, 0
            self.windows[name] = w
