"""The probe interface: what a probe needs, its default cadence, and how it returns records.

A probe is a small class. Passive probes (``passive = True``) observe the activations of
the training forwards through ``observe`` and return records from ``flush``; active
probes return records from ``measure`` on the fixed probe batch. No probe writes to
TensorBoard: the session hands the records to every sink.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from probes.functional.labels import label_matrix
from probes.records import Record

#: activation kinds whose zeros mean "gate closed" (module class names, lower case, and functional names)
RELU_FAMILY = frozenset({"relu", "relu6", "leakyrelu", "leaky_relu", "prelu", "rrelu"})


@dataclass(frozen=True)
class Site:
    """One place where activations are observed.

    ``name`` is the module path (``features.1``), ``path#k`` for the k-th call of a module
    called more than once per forward, ``path:relu`` (``:relu#k``) for a functional call
    inside the ``forward`` of the module at ``path`` (``forward`` for the root module).
    """

    name: str
    path: str
    kind: str  # lower-case activation name: "relu", "tanh", "gelu", ...
    call: int = 1  # 1-based call index of this module / function within one forward
    functional: bool = False
    module: nn.Module | None = field(default=None, compare=False, repr=False)

    @property
    def relu_family(self) -> bool:
        return self.kind in RELU_FAMILY


@dataclass
class Activation:
    """What the probe pass saw at one site: ``pre`` the activation's input, ``post`` its output."""

    site: Site
    pre: torch.Tensor
    post: torch.Tensor

    @property
    def gate(self) -> torch.Tensor:
        """``pre > 0``: for ReLU exactly the units whose output is non-zero."""
        return self.pre > 0


@dataclass(frozen=True)
class Call:
    """One event of the probe pass, in call order: a leaf-module call or a functional activation."""

    path: str  # module path ("" for the root); for functional activations the calling module's path
    kind: str  # lower-case class name ("linear", "relu", "conv2d") or function name ("relu")
    module: nn.Module | None = field(default=None, compare=False, repr=False)
    site: str | None = None  # the activation site name when this call is a site


@dataclass
class ProbeBatch:
    """What an active probe's ``measure`` receives: the probe batch and one shared capture.

    ``model`` is the user's module (unwrapped from DDP), in eval mode while probes run;
    ``output = model(x)`` computed without gradients; ``activations`` maps site names to
    captures in call order (filled when a due probe has ``needs_sites``); ``calls`` lists every
    leaf-module call and functional activation of the pass in order.
    """

    model: nn.Module
    x: Any
    y: torch.Tensor | None
    output: torch.Tensor | None
    activations: dict[str, Activation]
    step: int
    logdir: str | None = None
    calls: list[Call] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Number of probe samples P (0 when the session has no probe batch)."""
        if isinstance(self.output, torch.Tensor):
            return int(self.output.shape[0])
        return int(self.x.shape[0]) if isinstance(self.x, torch.Tensor) else 0

    def targets(self, probe: str = "probe", num_classes: int | None = None) -> torch.Tensor:
        """Labels as a float64 P x C matrix (binary as +-1 in one column, classes one-hot)."""
        if self.y is None:
            raise ValueError(f"{probe}: this probe needs labels; pass probe_data=(x, y) to probes.attach")
        if num_classes is None and self.output.ndim == 2 and self.output.shape[1] > 1:
            num_classes = int(self.output.shape[1])
        return label_matrix(self.y, num_classes=num_classes, who=probe)


@dataclass
class Context:
    """What a probe learns at attach: the unwrapped model, the probe batch, the log directory."""

    model: nn.Module
    x: Any = None
    y: torch.Tensor | None = None
    logdir: str | None = None
    device: torch.device = torch.device("cpu")


class Probe:
    """Base class of every probe (built-in or third party).

    Class attributes say what a probe needs: ``passive`` (observes training forwards),
    ``needs_sites`` (an active probe reading ``ProbeBatch.activations``), ``needs_probe_data``,
    and its default cadence ``every`` (in steps). Options given to ``attach`` arrive as
    keyword arguments of ``__init__``; ``every`` is taken by the session.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    every: ClassVar[int] = 100
    passive: ClassVar[bool] = False
    needs_sites: ClassVar[bool] = False
    needs_probe_data: ClassVar[bool] = True
    #: extra module types to treat as sites (beyond the activation modules), e.g. ``(nn.MaxPool2d,)``
    site_types: ClassVar[tuple[type[nn.Module], ...]] = ()

    def setup(self, context: Context) -> None:
        """Called once at attach; raise a clear error here when the model does not fit."""

    # -- passive probes -------------------------------------------------------------
    def wants(self, site: Site) -> bool:
        """Which sites a passive probe observes (default: ReLU-family sites)."""
        return site.relu_family

    def observe(self, site: Site, pre: torch.Tensor, post: torch.Tensor) -> None:
        """Hot path, every training forward: accumulate on the device, never sync."""

    def flush(self, step: int) -> Sequence[Record]:
        """Return the window's records and start a new window (passive probes)."""
        return []

    def reducible(self) -> list[torch.Tensor]:
        """Accumulators that the session sums over ranks before ``flush`` under DDP."""
        return []

    # -- active probes --------------------------------------------------------------
    def measure(self, batch: ProbeBatch) -> Sequence[Record]:
        """Return records for one measurement on the probe batch (active probes)."""
        return []

    # -- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
