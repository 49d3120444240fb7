"""``pathgram``: the neural path kernel ``H = Phi Phi^T`` of a Linear->ReLU chain and its label norm
``tr(Y^T H^{-1} Y)`` (seed 000; Lakshminarayanan & Singh 2020).

The probe class and the check of the chain it relies on; the kernel and its solve are in
``probes.functional.pathgram``. What it measures, its tags, options and cost: ``docs/probes/pathgram.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import cast

import torch
import torch.nn.functional as F

from probes import options
from probes.autodiff.pathgram import Chain, ModuleCall, find_chain
from probes.builtin._images import ImageCadence, declare_image_state, image_due
from probes.builtin._narrow import kept, labels, required
from probes.functional.labels import label_matrix
from probes.functional.pathgram import (
    PathGram,
    Workspace,
    factorize,
    input_gram,
    path_gram,
    quadratic_form,
)
from probes.inputs import take
from probes.probe import Needs, Pass, Probe, ProbeBatch
from probes.records import Image, Matrix, Record, Scalar

#: relative tolerance of the recomposition check
RECOMPOSE_RTOL = 1e-4


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.detach().double(), b.detach().double()
    return (a - b).abs().max() / (b.abs().max() + a.abs().max() + 1e-30)


def check_recomposition(
    batch: ProbeBatch | Pass,
    chain: Chain,
    X: torch.Tensor,
    who: str = "pathgram",
    rows: int = 256,
    gathered: Callable[..., AbstractContextManager[None]] | None = None,
) -> None:
    """Each gate's input must be its Linear applied to the previous gate's output (the flattened input
    for the first), and the model output the last Linear applied to the last gate's output; checked on
    the first ``rows`` samples (a chain is per sample: any sample shows a break).

    Args:
        batch: the probe pass (activations, output).
        chain: the chain found in it (``find_chain``).
        X: the flattened probe inputs.
        who: the name that error messages start with.
        rows: how many samples to check.
        gathered: ``ProbeBatch.gathered``: each Linear's weight is read inside ``gathered(linear)``, one Linear at a
            time (FSDP2 all-gathers its unit for the block); None: read directly.

    Raises:
        ValueError: a shape or value that breaks the Linear->ReLU chain, naming where.
    """
    gather = gathered if gathered is not None else (lambda *modules: nullcontext())
    m = min(rows, X.shape[0])
    h = X[:m]
    errors: list[torch.Tensor] = []
    where: list[str] = []
    with torch.no_grad():
        for k, (path, lin) in enumerate(chain.linears):
            if h.ndim != 2 or h.shape[-1] != lin.in_features:
                src = "the flattened input" if k == 0 else f"the output of gate {chain.gates[k - 1]!r}"
                raise ValueError(
                    f"{who}: Linear {path!r} expects {lin.in_features} features but {src} has shape "
                    f"{tuple(h.shape)}; the path gram needs a plain Linear->ReLU chain on P x d inputs"
                )
            with gather(lin):  # this Linear's whole weight for the block, under FSDP2; the next one after it
                z = F.linear(h.to(lin.weight.dtype), lin.weight, lin.bias)
            if k < len(chain.gates):
                act = batch.activations.get(chain.gates[k])
                if act is None:
                    raise ValueError(f"{who}: gate site {chain.gates[k]!r} was not captured on the probe pass")
                pre = kept(who, chain.gates[k], act.pre, "input")
                if pre.ndim != 2 or tuple(pre.shape) != (X.shape[0], z.shape[1]):
                    raise ValueError(
                        f"{who}: gate {chain.gates[k]!r} has input shape {tuple(pre.shape)} but "
                        f"Linear {path!r} gives {tuple(z.shape)}; something between them breaks "
                        "the Linear->ReLU chain"
                    )
                errors.append(_relative_error(z, pre[:m]))
                where.append(
                    f"the input of gate {chain.gates[k]!r} is not the output of Linear {path!r} applied to "
                    + ("the flattened input" if k == 0 else f"the output of gate {chain.gates[k - 1]!r}")
                )
                h = kept(who, chain.gates[k], act.post, "output")[:m]
            else:
                out = batch.output
                if (
                    not isinstance(out, torch.Tensor)
                    or out.ndim == 0
                    or out.shape[0] != X.shape[0]
                    or out[0].numel() != z.shape[1]
                ):
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(
                        f"{who}: the model output {shape} is not the output of the last Linear "
                        f"{path!r} ({X.shape[0]} x {z.shape[1]}); the path gram needs the Linear as "
                        "output layer"
                    )
                errors.append(_relative_error(z, out[:m].reshape(m, -1)))
                where.append(
                    f"the model output is not the output of Linear {path!r} applied to "
                    + (f"the output of gate {chain.gates[k - 1]!r}" if k else "the flattened input")
                )
    errs = torch.stack(errors).cpu().tolist()
    for e, msg in zip(errs, where):
        if not e <= RECOMPOSE_RTOL:
            raise ValueError(
                f"{who}: {msg} (relative difference {e:.2e}); a residual connection, scaling, "
                "normalization or functional call in forward breaks the Linear->ReLU chain"
            )


def flatten_input(x: object, who: str = "pathgram") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: the probe batch x must be a tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{who}: the probe batch x must have a batch axis and features, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def _label_order(Y: torch.Tensor) -> torch.Tensor:
    key = Y[:, 0] if Y.shape[1] == 1 else Y.argmax(dim=1).double()
    return torch.argsort(key, stable=True)


def gram_drawing(
    pg: PathGram, Y: torch.Tensor, mode: str = "cosine", side: int = 128, title: str = "pathgram/gram"
) -> Matrix:
    """The picture data of the path gram (host copies of the entries shown), samples sorted by label;
    above ``side`` samples, ``side`` of them evenly spaced in that order (each cell one entry of ``H``, the
    diagonal kept); label groups marked."""
    Y = Y.to(pg.h.device)
    order = _label_order(Y)
    P = order.numel()
    if P > side:
        order = order[torch.linspace(0, P - 1, side, device=order.device).round().long()]
    m = pg.entries(order, order)
    if mode == "cosine":
        d = torch.diagonal(m).clamp_min(1e-300).sqrt()
        m = m / d[:, None] / d[None, :]
        bar, vmax = "cosine H_ij / sqrt(H_ii H_jj)", 1.0
    else:
        m = m / m.abs().max().clamp_min(1e-300)
        bar, vmax = "H_ij / max |H|", None
    key = (Y[:, 0] if Y.shape[1] == 1 else Y.argmax(dim=1).double())[order].cpu()
    starts = (torch.nonzero(key[1:] != key[:-1]).flatten() + 1).tolist()
    names = [f"{v:g}" for v in key[[0, *starts]].tolist()] if key.numel() else []
    shown = f"{order.numel()} of {P} samples" if order.numel() < P else f"{P} samples"
    return Matrix(
        m.double().cpu().numpy(),
        tuple(starts),
        tuple(names),
        title=title,
        colorbar_label=bar,
        vmax=vmax,
        xlabel=f"probe sample j ({shown}, grouped by label)",
        ylabel="probe sample i (same order)",
    )


class PathGramProbe(Probe):
    """Neural path kernel ``H`` of a Linear->ReLU chain on the probe batch and ``tr(Y^T H^{-1} Y)``."""

    name = "pathgram"
    description = "neural path kernel of the ReLU gates and how well it fits the labels"
    every = 100
    passive = False
    # FSDP2: the recomposition check reads each Linear's weight inside ``batch.context.gathered(linear)``, one at a
    # time; the path gram itself needs only the probe pass's gates
    needs = Needs(sites=frozenset({"pre", "post"}), labels=True, probe_data=True, sharding="per_module")

    def __init__(
        self,
        condition: str = "estimate",
        image: str | None = "cosine",
        image_side: int = 128,
        jitter_start: float = 1e-12,
        jitter_max: float = 1e-2,
        check: bool = True,
        image_every: int | None = None,
        rcond: float | None = None,
    ) -> None:
        self.condition = options.choice("pathgram", "condition", condition, ("estimate", "exact", "off"))
        self.image = options.choice("pathgram", "image", image, ("cosine", "raw", None))
        self.image_side = required(options.integer("pathgram", "image_side", image_side, minimum=1))
        self.image_cadence = ImageCadence("pathgram", image_every)
        declare_image_state(self)
        self.jitter_start = required(options.number("pathgram", "jitter_start", jitter_start, positive=True))
        self.jitter_max = required(options.number("pathgram", "jitter_max", jitter_max, positive=True))
        options.ordered("pathgram", "jitter_start", jitter_start, "jitter_max", jitter_max)
        self.rcond = options.number("pathgram", "rcond", rcond, positive=True, below=1, optional=True)
        self.recompose = options.flag("pathgram", "check", check)  # option ``check``: ``self.check`` is the hook
        self._xx: tuple | None = None
        self._workspace = Workspace()

    def check(self, batch: ProbeBatch) -> None:
        """Inputs that flatten to ``P x d`` and a label per sample; on the at-attach pass, the model is a
        Linear->ReLU chain that recomposes from its layers (read off the pass), and the labels fit the model's
        outputs: what would otherwise fail at the first measurement."""
        flatten_input(batch.x)
        Y = label_matrix(labels("pathgram", batch), who="pathgram")
        if Y.shape[0] != batch.x.shape[0]:
            raise ValueError(f"pathgram: {Y.shape[0]} labels for {batch.x.shape[0]} probe samples")
        if batch.output is None:
            return
        found: ProbeBatch | Pass = batch
        if not batch.calls:  # a batch without the shared pass's trace: one pass over two samples shows the chain
            found = batch.context.run(
                take(batch.x, slice(0, 2)),
                keep=lambda site: frozenset({"pre", "post"}) if self.wants(site) else frozenset(),
            )
        if found.output is None:
            raise ValueError("pathgram: the probe pass over two samples gave no output")
        X = flatten_input(batch.x)[: found.output.shape[0]]
        chain = find_chain(cast("Sequence[ModuleCall]", found.calls))
        if self.recompose:
            check_recomposition(found, chain, X, rows=min(X.shape[0], 16), gathered=batch.context.gathered)
        batch.targets("pathgram")

    def compute(self, batch: ProbeBatch) -> tuple[PathGram, Chain]:
        """The rescaled path gram of the probe batch, after checking the chain structure."""
        X = flatten_input(batch.x)
        chain = find_chain(cast("Sequence[ModuleCall]", batch.calls))
        if self.recompose:
            check_recomposition(batch, chain, X, gathered=batch.context.gathered)
        gates = [kept("pathgram", s, batch.activations[s].pre, "input") > 0 for s in chain.gates]
        return path_gram(X, gates, chain.bias, xx=self._input_gram(X), workspace=self._workspace), chain

    def _input_gram(self, X: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``X X^T`` of the probe batch, computed once and reused while ``X`` is unchanged."""
        key = (X.data_ptr(), X._version, tuple(X.shape), X.dtype, X.device)
        if self._xx is None or self._xx[0] != key:
            self._xx = (key, input_gram(X))
        return self._xx[1]

    def measure(self, batch: ProbeBatch) -> list[Record]:
        pg, _ = self.compute(batch)
        Y = batch.targets("pathgram")
        P = pg.h.shape[0]
        if Y.shape[0] != P:
            raise ValueError(f"pathgram: {Y.shape[0]} label rows for a probe batch of {P} samples")
        Y = Y.to(pg.h.device)
        if not bool(pg.diagonal().max() > 0):
            raise ValueError(
                "pathgram: H = 0: no input-to-output path is open for any probe sample (a layer "
                "whose gates are all closed, i.e. the net is dead on the probe batch, or x = 0)"
            )
        # in place: pg.h then holds the factor below the diagonal and H above it (no second P x P matrix)
        fact = factorize(pg, self.jitter_start, self.jitter_max, condition=self.condition, rcond=self.rcond)
        q = quadratic_form(fact, Y)  # q(h); H = 2^e h  =>  q(H) = 2^-e q(h)
        trace = pg.diagonal().sum() + fact.shift * P
        e = torch.tensor(-pg.exponent, dtype=torch.float64, device=q.device)
        records: list[Record] = [
            Scalar("pathgram/norm", torch.ldexp(q, e)),
            Scalar("pathgram/log10_norm", torch.log10(q) + e * math.log10(2.0)),
            Scalar("pathgram/norm_normalized", q * trace),
            Scalar("pathgram/jitter", fact.jitter),
            Scalar("pathgram/singular", float(fact.singular)),
        ]
        if self.condition != "off":
            if fact.condition is None:
                raise RuntimeError("pathgram: factorize judged no condition of the factorized matrix")
            records.append(Scalar("pathgram/condition", fact.condition))
        if self.image is not None and image_due(self, self.image_cadence, batch.step):
            title = f"pathgram/gram: {'cosine of ' if self.image == 'cosine' else ''}path kernel H, step {batch.step}"
            records.append(Image("pathgram/gram", gram_drawing(pg, Y, self.image, self.image_side, title)))
        return records
