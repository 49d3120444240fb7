"""``pathgram``: the neural path kernel of a Linear->ReLU chain and its label norm (seed 000).

Lakshminarayanan & Singh 2020 ("Neural path features and neural path kernel") write a ReLU net as
``f(x) = sum_p phi_p(x) v_p`` over input-to-output paths; the gram of the path features,
``H = Phi Phi^T``, depends on the gates only:

    bias-free:   H = (X X^T) * prod_l A_l A_l^T
    with biases: S_0 = X X^T,  S_l = (S_{l-1} + b_l) * A_l A_l^T,  H = S_{L-1} + b_L

(``A_l`` the 0/1 gates ``pre > 0`` of hidden layer ``l`` on the probe batch, ``b_k = 1`` when Linear ``k``
has a bias; see ``functional.path_gram``). Logged, with ``Y`` the labels (binary +-1 in one column, classes one-hot):

- ``pathgram/norm``: ``q(H) = tr(Y^T H^{-1} Y)`` of the unscaled path gram (counts of shared active paths
  times ``<x, x'>``), float64. It scales like ``(n/2)^{-(L-1)}``: deep wide nets reach values below the
  float32 range that TensorBoard stores, so ``pathgram/log10_norm`` gives ``log10 q(H)`` as well.
- ``pathgram/norm_normalized``: ``q(H / tr H) = tr(H) q(H)``, the seed's ``y^T (H / tr H)^{-1} y``.
- ``pathgram/jitter``: ``delta``, when ``H + delta * mean(diag H) * I`` had to be factorized because ``H``
  is numerically singular (0 otherwise); both norms then refer to that matrix.
- ``pathgram/singular``: 1 when ``H`` is numerically singular, 0 otherwise: its float64 Cholesky failed, *or* it
  succeeded but the condition of ``H`` exceeds ``1 / rcond`` (default ``rcond = P * eps``, ``eps = 2.2e-16``,
  the tolerance of ``numpy.linalg.matrix_rank``: beyond it ``H^{-1} Y`` keeps no reliable digit, and ``q(H)``
  would be a number made of rounding errors, e.g. 7e14 for a rank-9 10 x 10 ``H`` of condition 3e16). ``H`` is
  then never reported as it is: the jitter route is taken, ``delta`` growing tenfold from ``jitter_start`` until
  the shifted matrix factorizes with a condition within ``1 / rcond`` (so ``pathgram/jitter > 0`` whenever this
  flag is 1). The condition that decides: with ``condition="exact"`` all eigenvalues, otherwise the block
  Lanczos estimate combined with the pivot bounds ``max diag H / min L_ii^2`` of the factor; the estimate runs
  for this check even with ``condition="off"`` (which then only leaves ``pathgram/condition`` out), since the
  pivot bounds alone miss singular path grams.
- ``pathgram/condition``: ``lambda_max / lambda_min`` of the factorized matrix; by default a block Lanczos
  estimate (Rayleigh-Ritz on Krylov spaces of ``H`` and of ``H^{-1}`` through the Cholesky factor), a lower
  bound within 8% on the path grams tried, at a fraction of the cost of the factorization;
  ``condition="exact"`` takes all eigenvalues (several times the cost of the factorization, P x P
  temporaries), ``"off"`` leaves the tag out (the estimate still runs for ``pathgram/singular``). The
  estimate is combined with the pivot bounds of the factor; both are lower bounds of the true condition.
- image ``pathgram/gram``: a heat map of ``H_ij / sqrt(H_ii H_jj)`` with a colour bar, samples grouped by
  label (lines between groups, the label on each), at most ``image_side`` samples evenly spaced in that order
  (``image="raw"`` shows ``H / max |H|``; ``image=None`` turns it off; ``image_every`` thins the images:
  None draws one at every measurement, k at the first, then once at least k steps have passed since the last).

Cost: the input gram ``X X^T`` (float64) is computed at the first measurement and reused while the probe
batch is unchanged (same storage and version counter); then each measurement costs one float32 ``A_l A_l^T``
per layer, the Hadamard products, one float64 Cholesky factorization (``P^3 / 3``) and ``O(P^2)`` more,
in buffers kept from one measurement to the next. On the CPU the symmetric products are computed only on
and below the diagonal, blockwise.

Options (checked when the probe is made; a bad type is a ``TypeError``, a bad value a ``ValueError``, both
naming the probe and the option): ``condition`` (``"estimate"``, ``"exact"``, ``"off"``), ``image``
(``"cosine"``, ``"raw"``, None), ``image_side`` (a positive int, 128), ``image_every`` (None or a positive
int), ``jitter_start`` / ``jitter_max`` (relative jitter range: positive finite floats, start <= max; 1e-12 and
1e-2), ``rcond`` (None for ``P * eps``, or a float in (0, 1): ``H`` is singular when
``lambda_min < rcond * lambda_max``), ``check`` (a bool: the recomposition check below; default on).

Memory: one measurement holds two P x P float64 matrices, the cached ``X X^T`` and the buffer in which the
products and then the Cholesky factorization are done in place (``functional.path_gram``), plus panels of a
few rows; at P = 10,000 about 1.5 GiB (``condition="exact"`` adds P x P temporaries for the eigenvalues).

The probe checks the structure it relies on: the probe pass must call ``Linear, ReLU, Linear, ...,
ReLU, Linear`` (a leading ``nn.Flatten`` and identities/dropouts are allowed), and recomposing the
chain from the Linear layers and the captured activations must reproduce each gate's input and the
model output, which catches residual connections, scalings or ``F.linear`` calls that no hook sees.

Under FSDP2 (``fully_shard``) every rank measures (``sharding = "per_module"``): the gates come from the probe
pass, and the recomposition check reads each Linear's weight inside ``batch.gathered(linear)``, one unit at a time;
the values are those of one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from probes import options
from probes.builtin._images import ImageCadence, declare_image_state, image_due
from probes.engine.inputs import take
from probes.functional.labels import label_matrix
from probes.functional.path_gram import (
    PathGram,
    Workspace,
    factorize,
    input_gram,
    path_gram,
    quadratic_form,
)
from probes.probe import Context, Pass, Probe, ProbeBatch
from probes.records import Image, Matrix, Record, Scalar

#: leaf modules that are the identity in eval mode and may sit anywhere in the chain
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.AlphaDropout, nn.FeatureAlphaDropout)
#: gate kinds for which post = pre * (pre > 0), i.e. the path kernel's 0/1 gates
GATE_KINDS = frozenset({"relu"})
#: relative tolerance of the recomposition check
RECOMPOSE_RTOL = 1e-4


@dataclass
class Chain:
    """A Linear->gate chain found in the probe pass: ``linears[k]`` then gate ``gates[k]`` (site names)."""

    linears: list[tuple[str, nn.Linear]]
    gates: list[str]

    @property
    def bias(self) -> list[bool]:
        return [lin.bias is not None for _, lin in self.linears]


def find_chain(batch: ProbeBatch | Pass, who: str = "pathgram") -> Chain:
    """Read ``Linear, gate, Linear, ..., Linear`` off ``batch.calls``; raise naming the module that breaks it."""
    if not batch.calls:
        raise ValueError(
            f"{who}: the probe pass recorded no module calls; is the model an nn.Module whose "
            "forward calls Linear layers?"
        )
    linears: list[tuple[str, nn.Linear]] = []
    gates: list[str] = []
    expect_linear = True
    for call in batch.calls:
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
                if act.pre.ndim != 2 or tuple(act.pre.shape) != (X.shape[0], z.shape[1]):
                    raise ValueError(
                        f"{who}: gate {chain.gates[k]!r} has input shape {tuple(act.pre.shape)} but "
                        f"Linear {path!r} gives {tuple(z.shape)}; something between them breaks "
                        "the Linear->ReLU chain"
                    )
                errors.append(_relative_error(z, act.pre[:m]))
                where.append(
                    f"the input of gate {chain.gates[k]!r} is not the output of Linear {path!r} applied to "
                    + ("the flattened input" if k == 0 else f"the output of gate {chain.gates[k - 1]!r}")
                )
                h = act.post[:m]
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
    # FSDP2: the recomposition check reads each Linear's weight inside ``batch.gathered(linear)``, one at a time;
    # the path gram itself needs only the probe pass's gates
    sharding = "per_module"
    description = "neural path kernel of the ReLU gates and how well it fits the labels"
    every = 100
    passive = False
    needs_sites = True
    needs_probe_data = True

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
        self.image_side = options.integer("pathgram", "image_side", image_side, minimum=1)
        self.image_cadence = ImageCadence("pathgram", image_every)
        declare_image_state(self)
        self.jitter_start = options.number("pathgram", "jitter_start", jitter_start, positive=True)
        self.jitter_max = options.number("pathgram", "jitter_max", jitter_max, positive=True)
        options.ordered("pathgram", "jitter_start", jitter_start, "jitter_max", jitter_max)
        self.rcond = options.number("pathgram", "rcond", rcond, positive=True, below=1, optional=True)
        self.check = options.flag("pathgram", "check", check)
        self._xx: tuple | None = None
        self._workspace = Workspace()

    def setup(self, context: Context) -> None:
        if context.y is None:
            raise ValueError("pathgram: this probe needs labels; pass probe_data=(x, y) to probes.attach")
        flatten_input(context.x)
        Y = label_matrix(context.y, who="pathgram")
        if Y.shape[0] != context.x.shape[0]:
            raise ValueError(f"pathgram: {Y.shape[0]} labels for {context.x.shape[0]} probe samples")

    def validate(self, batch: ProbeBatch) -> None:
        """The model is a Linear->ReLU chain that recomposes from its layers (read off the at-attach pass), and the
        labels fit the model's outputs: what would otherwise fail at the first measurement."""
        found: ProbeBatch | Pass = batch
        if not batch.calls:  # a batch without the shared pass's trace: one pass over two samples shows the chain
            found = batch.run(
                take(batch.x, slice(0, 2)),
                keep=lambda site: frozenset({"pre", "post"}) if self.wants_site(site) else frozenset(),
            )
        X = flatten_input(batch.x)[: found.output.shape[0]]
        chain = find_chain(found)
        if self.check:
            check_recomposition(found, chain, X, rows=min(X.shape[0], 16), gathered=batch.gathered)
        batch.targets("pathgram")

    def compute(self, batch: ProbeBatch) -> tuple[PathGram, Chain]:
        """The rescaled path gram of the probe batch, after checking the chain structure."""
        X = flatten_input(batch.x)
        chain = find_chain(batch)
        if self.check:
            check_recomposition(batch, chain, X, gathered=batch.gathered)
        gates = [batch.activations[s].pre > 0 for s in chain.gates]
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
            records.append(Scalar("pathgram/condition", fact.condition))
        if self.image is not None and image_due(self, self.image_cadence, batch.step):
            title = f"pathgram/gram: {'cosine of ' if self.image == 'cosine' else ''}path kernel H, step {batch.step}"
            records.append(Image("pathgram/gram", gram_drawing(pg, Y, self.image, self.image_side, title)))
        return records
