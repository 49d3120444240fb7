"""The model side of the path gram: the ``Linear, gate, Linear, ..., Linear`` chain read off the calls of a probe
pass, or the module that breaks it. The kernel itself is ``probes.functional.pathgram``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn


class ModuleCall(Protocol):
    """One event of a probe pass as ``find_chain`` reads it (``probes.probe.Call`` is one)."""

    path: str
    kind: str
    module: nn.Module | None
    site: str | None


#: leaf modules that are the identity in eval mode and may sit anywhere in the chain
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.AlphaDropout, nn.FeatureAlphaDropout)


#: gate kinds for which post = pre * (pre > 0), i.e. the path kernel's 0/1 gates
GATE_KINDS = frozenset({"relu"})


@dataclass
class Chain:
    """A Linear->gate chain found in the probe pass: ``linears[k]`` then gate ``gates[k]`` (site names)."""

    linears: list[tuple[str, nn.Linear]]
    gates: list[str]

    @property
    def bias(self) -> list[bool]:
        return [lin.bias is not None for _, lin in self.linears]


def find_chain(calls: Sequence[ModuleCall], who: str = "pathgram") -> Chain:
    """Read ``Linear, gate, Linear, ..., Linear`` off the calls of a probe pass (``batch.calls``); raise naming the
    module that breaks it."""
    if not calls:
        raise ValueError(
            f"{who}: the probe pass recorded no module calls; is the model an nn.Module whose "
            "forward calls Linear layers?"
        )
    linears: list[tuple[str, nn.Linear]] = []
    gates: list[str] = []
    expect_linear = True
    for call in calls:
        where = f"module {call.path or '<root>'!r} ({call.kind})"
        if call.site is None and isinstance(call.module, PASS_THROUGH):
            continue
        if call.site is None and isinstance(call.module, nn.Flatten):
            if linears:
                raise ValueError(
                    f"{who}: {where} comes after Linear {linears[-1][0]!r}; only a leading Flatten "
                    "fits a Linear->ReLU chain"
                )
            continue
        if expect_linear:
            if call.site is None and isinstance(call.module, nn.Linear):
                linears.append((call.path, call.module))
                expect_linear = False
                continue
            what = f"activation site {call.site!r}" if call.site is not None else where
            after = f"after gate {gates[-1]!r}" if gates else "at the start of the chain"
            raise ValueError(
                f"{who}: {what} {after} where an nn.Linear was expected; the path gram applies to "
                "Linear->ReLU chains only (an MLP of nn.Linear and nn.ReLU); leave pathgram out for "
                "this model"
            )
        if call.site is not None:
            if call.kind not in GATE_KINDS:
                raise ValueError(
                    f"{who}: activation site {call.site!r} is a {call.kind}; the neural path kernel "
                    "needs 0/1 gates, i.e. ReLU (post = pre * (pre > 0)) after every hidden Linear"
                )
            gates.append(call.site)
            expect_linear = True
            continue
        raise ValueError(
            f"{who}: {where} follows Linear {linears[-1][0]!r} where a ReLU was expected; the path "
            "gram applies to Linear->ReLU chains only (an MLP of nn.Linear and nn.ReLU); leave pathgram "
            "out for this model"
        )
    if not linears:
        raise ValueError(f"{who}: the probe pass called no nn.Linear; the path gram applies to Linear->ReLU chains")
    if expect_linear:
        raise ValueError(f"{who}: the chain ends with gate {gates[-1]!r}; the path gram needs a Linear output layer")
    return Chain(linears, gates)
