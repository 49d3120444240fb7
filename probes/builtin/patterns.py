"""``patterns``: the gates ``pre > 0`` of every activation site on the probe batch, how they move between
measurements, and the distinct whole-network patterns (linear regions) the probe batch meets.

The probe class; packed snapshots are saved and loaded by ``probes.functional.patterns``. What it measures, its
tags, options and cost: ``docs/probes/patterns.md``.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from probes import options
from probes.builtin._images import ImageCadence, declare_image_state, image_due
from probes.functional.patterns import PackedGates, distinct_packed_rows
from probes.functional.relu_zeros import unit_axis
from probes.inputs import take
from probes.probe import Needs, Probe, ProbeBatch
from probes.records import Gates, Image, Record, Scalar
from probes.snapshots import save_gates, snapshot_path


def _unit_dim(ndim: int, override: int | None) -> int:
    return unit_axis(ndim, override)[0]


def _check_folder(directory: str) -> None:
    """Whether the snapshot folder ``directory`` can be made: its nearest existing ancestor must be a writable
    folder. Checked at attach, so that a path that cannot hold the snapshots fails there, naming the option; the
    folder itself is made at the first snapshot (attach writes nothing, and under FSDP only rank 0 saves).

    Raises:
        ValueError: a file in the way, or a folder without write permission.
    """
    path = Path(directory).absolute()
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        why = "is not a folder" if not ancestor.is_dir() else "is not writable"
        raise ValueError(
            f"patterns: option 'directory'={directory!r}: the snapshots (save=True) cannot be written "
            f"there ({str(ancestor)!r} {why})"
        )


def _groups(y: torch.Tensor | None, P: int) -> tuple[torch.Tensor, list[int], list[str]]:
    """Sample order grouping equal labels, the positions where a new group starts, and the groups' labels."""
    if y is None or not isinstance(y, torch.Tensor) or y.shape[0] != P:
        return torch.arange(P), [], []
    key = y.detach().cpu()
    if key.ndim == 2 and not key.is_floating_point():  # token labels (P, T): no one label per sample to group by
        return torch.arange(P), [], []
    if key.ndim > 1:
        key = key.reshape(P, -1)
        key = key.argmax(dim=1) if key.shape[1] > 1 else key[:, 0]
    order = torch.argsort(key.double(), stable=True)
    sorted_key = key[order]
    if torch.unique(sorted_key).numel() > 64:  # regression targets: ordered, not grouped
        return order, [], []
    starts = (torch.nonzero(sorted_key[1:] != sorted_key[:-1]).flatten() + 1).tolist()
    names = [f"{v:g}" for v in sorted_key[[0, *starts]].double().tolist()]
    return order, starts, names


#: a gate image has at most this many rows (blocks of gates averaged beyond it)
MAX_IMAGE_ROWS = 512


def gate_drawing(
    gates: torch.Tensor,
    order: torch.Tensor,
    starts: list[int],
    names: Sequence[str] = (),
    title: str = "gates on the probe batch",
    ndim: int = 2,
    real: torch.Tensor | None = None,
) -> Gates:
    """The picture data of a P x units gate matrix (a host copy of the gates): units (y) by samples (x)
    in ``order``, a line before every group start, the groups' labels ``names`` under them. ``real``
    (broadcastable to ``gates``: true at the gates of real tokens, as the attention mask says) marks the
    others as padding, drawn in a colour of their own instead of as closed gates."""
    flat = gates.reshape(gates.shape[0], -1)
    kept = None if real is None else real.expand(gates.shape).reshape(gates.shape[0], -1)
    unit = "unit" if ndim <= 2 else "gate (unit x position, flattened)"
    units = flat.shape[1]
    padding = None
    if units > MAX_IMAGE_ROWS:  # more gates than pixel rows: show the open fraction of blocks of gates
        block = -(-units // MAX_IMAGE_ROWS)
        extra = block * MAX_IMAGE_ROWS - units
        if kept is None:
            kept = torch.ones_like(flat, dtype=torch.bool)
        if extra:
            flat = torch.cat([flat, flat.new_zeros(flat.shape[0], extra)], dim=1)
            kept = torch.cat([kept, kept.new_zeros(kept.shape[0], extra)], dim=1)
        counts = flat.reshape(flat.shape[0], MAX_IMAGE_ROWS, block).sum(dim=2, dtype=torch.int32)
        reals = kept.reshape(kept.shape[0], MAX_IMAGE_ROWS, block).sum(dim=2, dtype=torch.int32)
        # the open fraction of a block's real gates; a block of padding only is padding
        m = (counts.float() / reals.clamp(min=1).float()).cpu().numpy()[order.numpy()]
        if real is not None:
            padding = (reals == 0).cpu().numpy()[order.numpy()]
        unit = f"{unit}, open fraction of blocks of {block}"
    else:
        m = flat.to(torch.uint8).cpu().numpy()[order.numpy()]
        if kept is not None:
            padding = (~kept).cpu().numpy()[order.numpy()]
    return Gates(m, tuple(starts), tuple(names), title=title, unit_label=unit, total=units, padding=padding)


class Patterns(Probe):
    """Gate patterns ``pre > 0`` per site on the probe batch: activity, dead units, churn, distinct regions."""

    name = "patterns"
    description = "which ReLU gates are open on the probe batch and how they change"
    every = 100
    passive = False
    needs = Needs(sites=frozenset({"gate"}), probe_data=True)
    # declared states (``add_state``), for the type checker
    first: dict[str, torch.Tensor]
    previous: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    first_step: int | None

    def __init__(
        self,
        sites: str | Sequence[str] | None = None,
        unit_dim: int | None = None,
        image: bool = True,
        save: bool = False,
        directory: str | None = None,
        image_every: int | None = None,
    ) -> None:
        self.sites = options.names("patterns", "sites", sites)
        self.unit_dim = options.integer("patterns", "unit_dim", unit_dim, optional=True)
        self.image = options.flag("patterns", "image", image)
        self.image_cadence = ImageCadence("patterns", image_every)
        declare_image_state(self)
        self.save = options.flag("patterns", "save", save)
        self.directory = options.path("patterns", "directory", directory, optional=True)
        # persistent references (checkpointed): the first and the previous gates of each site, packed one bit per
        # gate (``pack_rows``: P x ceil(n / 8) uint8), with each site's gate shape
        self.add_state("first", {}, reduce=None, window=False)
        self.add_state("previous", {}, reduce=None, window=False)
        self.add_state("shapes", {}, reduce=None, window=False)
        self.add_state("first_step", None, reduce=None, window=False)

    def check(self, batch: ProbeBatch) -> None:
        """A folder for the snapshots (``save=True``); on the at-attach pass, the model has activation sites, and
        ``sites`` matches some of them (two samples show them)."""
        logdir = batch.context.logdir
        if self.save and self.directory is None:
            if logdir is None:
                raise ValueError(
                    "patterns: save=True needs a log directory (attach(..., logdir=...)) or "
                    "directory=... for the snapshots"
                )
            self.directory = str(Path(logdir) / "patterns")
        if self.save:
            _check_folder(self._directory())
        if batch.output is not None:
            keep = lambda site: frozenset({"gate"})  # noqa: E731
            self._site_names(batch.context.run(take(batch.x, slice(0, 2)), keep=keep).activations)

    def _directory(self) -> str:
        """The snapshots' folder (``save=True``): given, or set by ``check``."""
        if self.directory is None:
            raise ValueError("patterns: save=True and no folder for the snapshots (check sets it at attach)")
        return self.directory

    def _select(self, names: list[str]) -> list[str]:
        if self.sites is None:
            return names
        unmatched = [p for p in self.sites if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ValueError(
                f"patterns: option 'sites': {unmatched} match no activation site of the model; its sites are {names}"
            )
        return [n for n in names if any(n == p or fnmatch.fnmatchcase(n, p) for p in self.sites)]

    def _site_names(self, activations: dict) -> list[str]:
        names = self._select([n for n, a in activations.items() if self.wants(a.site)])
        if not names:
            raise ValueError(
                "patterns: the model has no activation site on the probe pass (no ReLU, GELU, ... "
                "module or functional call was seen); patterns reads the gates of activations, so "
                "it cannot apply to this model"
            )
        return names

    def measure(self, batch: ProbeBatch) -> list[Record]:
        names = self._site_names(batch.activations)
        P = batch.size
        gates: dict[str, torch.Tensor] = {}
        real: dict[str, torch.Tensor] = {}  # sites with padded positions: True at the gates of real tokens
        for n in names:
            gate = batch.activations[n].gate  # the pass kept only the gates: no copy
            if gate.ndim == 0 or gate.shape[0] != P:
                raise ValueError(
                    f"patterns: site {n!r} has shape {tuple(gate.shape)}; its first axis must be the {P} probe samples"
                )
            m = self._real(batch.mask, gate)
            if m is not None:
                real[n] = m
                gate = gate & m  # padded positions closed: they add nothing to what follows
            gates[n] = gate
        for n, g in gates.items():
            old = self.shapes.get(n)
            if old is not None and tuple(old) != tuple(g.shape):
                raise ValueError(
                    f"patterns: site {n!r} has gate shape {tuple(g.shape)} but the first snapshot had "
                    f"{tuple(old)}; the probe batch or the model changed"
                )
        packed = {n: PackedGates.of(g) for n, g in gates.items()}  # snapshots kept at one bit per gate
        draw = self.image and image_due(self, self.image_cadence, batch.step)
        order, starts, group_names = _groups(batch.y, P) if draw else (None, [], [])
        records: list[Record] = []
        for n, g in gates.items():
            ud, fits = unit_axis(g.ndim, self.unit_dim)
            if not fits:
                message = (
                    f"patterns: option 'unit_dim'={self.unit_dim} is out of range for the {g.ndim}-d gates "
                    f"of site {n!r}; that site counts its units on axis {ud} (the default)"
                )
                batch.context.notice(f"unit-dim:{n}", message)
            dims = tuple(d for d in range(g.ndim) if d != ud)
            m = real.get(n)
            count = g.numel() if m is None else m.expand(g.shape).sum(dtype=torch.int64).double()
            if g.ndim > 1:
                on = g if m is None else g | ~m  # padded positions do not stop a unit from being always on
                per_unit_any, per_unit_all = g.any(dim=dims) if dims else g, on.all(dim=dims) if dims else on
            else:
                per_unit_any, per_unit_all = g.any().reshape(1), g.all().reshape(1)
            prev = self._unpack(self.previous, n, g) if n in self.previous else g
            first = self._unpack(self.first, n, g) if n in self.first else g
            records += [
                Scalar(f"patterns/{n}/active_fraction", g.sum(dtype=torch.int64).double() / count),
                Scalar(f"patterns/{n}/dead_on_probe_batch", (~per_unit_any).sum()),
                Scalar(f"patterns/{n}/always_on_units", per_unit_all.sum()),
                Scalar(f"patterns/{n}/churn", (g != prev).sum(dtype=torch.int64).double() / count),
                Scalar(f"patterns/{n}/churn_from_init", (g != first).sum(dtype=torch.int64).double() / count),
            ]
            if draw and order is not None:  # order: drawn
                title = f"patterns/{n}: gates on the probe batch, step {batch.step}"
                records.append(
                    Image(f"patterns/{n}", gate_drawing(g, order, starts, group_names, title, g.ndim, real.get(n)))
                )
            del prev, first
        records.insert(0, Scalar("patterns/distinct", distinct_packed_rows([p.bits for p in packed.values()])))
        for n, p in packed.items():
            self.previous[n] = p.bits
            if n not in self.first:
                self.first[n] = p.bits
                self.shapes[n] = tuple(p.shape)
        if self.first_step is None:
            self.first_step = batch.step
        if self.save and batch.context.writes:  # under FSDP every rank measures; rank 0 alone writes
            save_gates(
                snapshot_path(self._directory(), batch.step),
                gates,
                batch.step,
                labels=batch.y if isinstance(batch.y, torch.Tensor) else None,
            )
        return records

    def _real(self, mask: torch.Tensor | None, gate: torch.Tensor) -> torch.Tensor | None:
        """``mask`` shaped to broadcast over ``gate`` when the gate has a value per position ``(P, T, ...)`` with its
        units after the positions; None otherwise (no mask, or a site without positions)."""
        if mask is None or gate.ndim < 3 or tuple(gate.shape[:2]) != tuple(mask.shape):
            return None
        if _unit_dim(gate.ndim, self.unit_dim) < 2:
            return None
        return mask.to(gate.device).reshape(*mask.shape, *(1,) * (gate.ndim - 2))

    def _unpack(self, store: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
        """A kept snapshot as booleans on the device of ``like`` (a checkpoint from elsewhere, a moved model)."""
        return PackedGates(store[name], tuple(self.shapes[name])).unpack(like.device)
