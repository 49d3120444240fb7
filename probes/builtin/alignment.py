"""``alignment``: centered kernel alignment (linear CKA) of each site's features, and of the model output, with
the labels (seed 004; Cortes, Mohri & Rostamizadeh 2012).

The probe class: which sites, the memory budget that groups them into passes, token labels and padding; the
formula is in ``probes.functional.alignment``. What it measures, its tags, options and cost:
``docs/probes/alignment.md``.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from probes import options
from probes.builtin._narrow import labels
from probes.builtin._tokens import token_pairs
from probes.engine.failures import say
from probes.functional.alignment import DegenerateKernelError, Prepared, prepare
from probes.functional.labels import IGNORE_INDEX, POSITIONS, is_token_labels, label_matrix, token_rows
from probes.inputs import take
from probes.options import option
from probes.probe import Needs, Probe, ProbeBatch, Site
from probes.records import Record, Scalar

OUTPUT = "output"
#: default ``memory_budget`` (bytes) for the features held at once: a CIFAR ResNet-18 at P = 1,024 holds 2.2 GiB
MEMORY_BUDGET = 512 << 20


def _token_shaped(t: torch.Tensor, y: torch.Tensor) -> bool:
    return t.ndim >= 3 and tuple(t.shape[:2]) == tuple(y.shape)


class Alignment(Probe):
    """Centered alignment (linear CKA) of each site's post-activation features with ``Y Y^T``."""

    name = "alignment"
    description = "how well each layer's features line up with the labels (centered CKA)"
    every = 100
    passive = False
    needs = Needs(sites=frozenset({"post"}), labels=True, probe_data=True)

    @dataclass(frozen=True)
    class Options:
        sites: str | Sequence[str] | None = option(None, options.names, doc="site names or fnmatch patterns")
        output: bool = option(True, options.flag, doc="align the model output too (alignment/output/cka)")
        degenerate: str = option(
            "skip", options.choice, allowed=("raise", "skip"), doc="a site whose kernel centers to zero: raise or skip"
        )
        memory_budget: int | None = option(
            MEMORY_BUDGET, options.integer, minimum=1, optional=True, doc="bytes of features held at once (None: all)"
        )
        positions: str = option("all", options.choice, allowed=POSITIONS, doc="token labels: kept positions")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._per_class_checked = False
        #: the shared probe pass keeps the chosen sites (no budget, or they fit it: known after one measurement)
        self._shared = self.options.memory_budget is None
        self._checked_patterns = False
        self._warned: set[str] = set()
        self._seen: tuple | None = None  # ((step, model, x), sites seen on two samples): see _probe_sites

    def check(self, batch: ProbeBatch) -> None:
        """Labels that vary (or token labels with a labelled position); on the at-attach pass, labels that index the
        model's outputs, chosen sites that exist, a tensor output when it is aligned too."""
        y = batch.y
        if y is not None and is_token_labels(y):  # which positions are samples depends on the shift and the mask
            if not bool((y != IGNORE_INDEX).any()):
                raise ValueError(f"alignment: every token label is {IGNORE_INDEX} (no position has a label)")
        elif y is not None:
            self._check_labels(y)
        if batch.output is not None:
            self._check_pass(batch)

    def _check_labels(self, y: torch.Tensor) -> None:
        Y = label_matrix(y, who="alignment")
        if Y.shape[0] < 2:
            raise ValueError(f"alignment: the probe batch has {Y.shape[0]} sample(s); centering needs at least 2")
        Yc = Y - Y.mean(dim=0, keepdim=True)
        if not bool(torch.linalg.vector_norm(Yc) > 1e-10 * torch.linalg.vector_norm(Y)):
            raise DegenerateKernelError(
                "alignment: the labels of the probe batch are all the same, so Y Y^T centers to zero and the "
                "alignment is 0/0; use a probe batch with more than one class (or non-constant targets)"
            )

    def wants(self, site: Site) -> bool:
        # otherwise the probe runs its own passes, group of sites by group
        return self._shared and super().wants(site)

    def _activation_names(self, activations: dict) -> list[str]:
        """The chosen sites among ``activations`` (activation sites only: not other probes' extra sites)."""
        return self._select([n for n, a in activations.items() if Probe.wants(self, a.site)])

    def _held(self, batch: ProbeBatch) -> bool:
        """Whether the probe pass kept the outputs of every chosen site (for this probe or another)."""
        acts = batch.activations
        if self._shared or not acts:
            return self._shared
        return all(acts[n].post is not None for n in self._activation_names(acts))

    def _probe_sites(self, batch: ProbeBatch) -> dict:
        """The sites of the model and what each gives, from one pass over two probe samples (kept for the rest of
        this step: ``check`` at attach, then the at-attach measurement)."""
        key = (batch.step, id(batch.model), id(batch.x))
        if self._seen is None or self._seen[0] != key:
            acts = batch.context.run(
                take(batch.x, slice(0, 2)),
                keep=lambda site: frozenset({"post"}) if Probe.wants(self, site) else frozenset(),
            ).activations
            self._seen = (key, acts)
        return self._seen[1]

    def _groups(self, batch: ProbeBatch) -> tuple[list[str], list[list[str]]]:
        """The chosen sites, and groups of them whose features (P x d_s floats) fit the memory budget."""
        acts = self._probe_sites(batch)
        names = self._activation_names(acts)
        P = batch.size
        groups: list[list[str]] = []
        used = 0
        for n in names:
            post = acts[n].post
            size = P * post[0].numel() * post.element_size()
            if groups and used + size <= self.memory_budget:
                groups[-1].append(n)
                used += size
            else:
                groups.append([n])
                used = size
        return names, groups

    def _grouped_features(
        self, batch: ProbeBatch, groups: list[list[str]]
    ) -> Iterator[tuple[str, torch.Tensor | None]]:
        """``(site, features)`` group by group: one pass of the engine's probe pass over the probe batch per group
        of sites (in chunks of the session's ``probe_batch_size``)."""
        for group in groups:
            wanted = set(group)

            def keep(site: Site, w: set[str] = wanted) -> frozenset[str]:
                return frozenset({"post"}) if site.name in w else frozenset()

            kept = batch.context.run(batch.x, keep=keep)
            acts = kept.activations
            del kept
            for n in group:
                yield n, acts.pop(n).post

    def _check_pass(self, batch: ProbeBatch) -> None:
        """Labels that index the model's outputs, chosen sites that exist, a tensor output when it is aligned too."""
        if self.output and not isinstance(batch.output, torch.Tensor):
            raise TypeError(
                f"alignment: the model output is a {type(batch.output).__name__}, not a tensor; "
                "pass output=False (or output= to attach, to pick a tensor)"
            )
        if batch.y is not None and isinstance(batch.output, torch.Tensor):
            self._labels(batch)
        acts = self._probe_sites(batch)
        names = self._activation_names(acts)
        y = batch.y
        if y is not None and is_token_labels(y) and self.sites is not None:
            T = y.shape[1]
            for n in names:
                post = acts[n].post
                if post is not None and (post.ndim < 3 or post.shape[1] != T):
                    raise ValueError(self._not_token_wise(n, post, y))
        if self.output and OUTPUT in names:
            raise ValueError(
                "alignment: the model has an activation site named 'output', which clashes with the "
                "tag alignment/output/cka of the model output; pass output=False or select sites"
            )

    def _labels(self, batch: ProbeBatch) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``(index, Y, classes)``: for token labels the kept ``(sample, position)`` pairs and their label matrix,
        else ``(None, batch.targets(), None)``; ``classes`` the integer labels per sample (for the per-class check)."""
        y = batch.y
        if y is None or not is_token_labels(y):
            Y = batch.targets("alignment")
            classes = y if isinstance(y, torch.Tensor) and not y.is_floating_point() and y.ndim == 1 else None
            return None, Y, classes
        out = batch.output
        if self.output and isinstance(out, torch.Tensor) and not _token_shaped(out, y):
            raise ValueError(
                f"alignment: token labels {tuple(y.shape)} need an output (P, T, C) with a value "
                f"per position, but the model output has shape {tuple(out.shape)}; pass output=False to "
                "align the sites only, or one label per sample"
            )
        index, yk = token_pairs("alignment", batch, self.positions, notice=True)
        C = int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.ndim == 3 and out.shape[-1] > 1 else None
        try:
            Y = label_matrix(yk, num_classes=C, who="alignment")
        except ValueError as exc:
            if C is None:  # no output size to name: the labels' own message
                raise
            raise ValueError(
                f"{exc}: the model has {C} outputs per position, so token labels must lie in 0..{C - 1} "
                f"(or be {IGNORE_INDEX})"
            ) from None
        return index, Y, yk

    def _not_token_wise(self, site: str, f: torch.Tensor, y: torch.Tensor) -> str:
        return (
            f"alignment: site {site!r} has activations of shape {tuple(f.shape)}, not (P, T, ...) with the "
            f"{y.shape[1]} positions of the token labels {tuple(y.shape)}, so they cannot pair with a label per "
            "position; leave it out with sites=[...] (the sites with a value per position)"
        )

    def _check_per_class(self, classes: torch.Tensor | None, tokens: bool, batch: ProbeBatch) -> None:
        """Once per probe: a notice when the samples (or kept positions) number fewer than twice the classes."""
        if self._per_class_checked or classes is None:
            return
        self._per_class_checked = True
        n, k = int(classes.numel()), int(torch.unique(classes).numel())
        if k > 2 and n < 2 * k:
            what = "labelled positions (the samples of token labels)" if tokens else "samples"
            batch.context.notice(
                "per-class",
                f"alignment: the probe batch has {n} {what} in {k} classes, fewer than two per class: centered, "
                "the label kernel Y Y^T is then close to the identity, and almost any features align with it (the "
                "value does not depend on which sample has which label); use a larger probe batch, at least "
                f"{2 * k} {what} (two or more per class)",
            )

    def _rows(self, site: str, f: torch.Tensor, batch: ProbeBatch, index: torch.Tensor | None) -> torch.Tensor | None:
        """The features of ``site`` as rows (one per sample, or per kept position for token labels): a new tensor,
        or a view of the capture; None for a site left out (not token-wise under the default ``sites``)."""
        P = batch.size
        if f.ndim == 0 or f.shape[0] != P:
            raise ValueError(
                f"alignment: site {site!r} has {f.shape[0] if f.ndim else 0} rows for a probe batch of "
                f"{P} samples (only activations with the batch as first axis are supported)"
            )
        f = f.detach()
        if index is not None:  # token labels
            y = labels("alignment", batch)
            if _token_shaped(f, y):
                return token_rows(f, index)
            if self.sites is not None or site == OUTPUT:
                raise ValueError(self._not_token_wise(site, f, y))
            batch.context.notice(f"not-token-wise:{site}", self._not_token_wise(site, f, y) + "; left out (said once)")
            return None
        mask = batch.mask
        if mask is not None and f.ndim >= 3 and tuple(f.shape[:2]) == tuple(mask.shape):
            # one label per sequence: padded positions add nothing to the inner products of F F^T
            f = f * mask.to(f.device).reshape(*mask.shape, *(1,) * (f.ndim - 2))
        return f.reshape(P, -1)

    # ------------------------------------------------------------------------------------------
    def _select(self, names: list[str]) -> list[str]:
        if self.sites is None:
            return names
        chosen = [n for n in names if any(n == p or fnmatch.fnmatchcase(n, p) for p in self.sites)]
        if not self._checked_patterns:
            unmatched = [p for p in self.sites if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]
            if unmatched:
                raise ValueError(
                    f"alignment: option 'sites': {unmatched} match no activation site of the model; "
                    f"its sites are {names}"
                )
            self._checked_patterns = True
        return chosen

    def measure(self, batch: ProbeBatch) -> list[Record]:
        if not self._held(batch):
            names, groups = self._groups(batch)
            self._shared = len(groups) <= 1  # all fit: from the next measurement on, the shared pass keeps them
            features = self._grouped_features(batch, groups)
        else:
            names = self._activation_names(batch.activations)
            features = ((n, batch.activations[n].post) for n in names)
        if self.output and OUTPUT in names:
            raise ValueError(
                "alignment: the model has an activation site named 'output', which clashes with the "
                "tag alignment/output/cka of the model output; pass output=False or select sites"
            )
        if self.output:
            if not isinstance(batch.output, torch.Tensor):
                raise TypeError(
                    f"alignment: the model output is a {type(batch.output).__name__}, not a tensor; pass output=False"
                )
            features = itertools.chain(features, [(OUTPUT, batch.output)])
            names = [*names, OUTPUT]
        if not names:
            return []
        P = batch.size
        index, Y, classes = self._labels(batch)
        if index is None and Y.shape[0] != P:
            raise ValueError(f"alignment: {Y.shape[0]} labels for a probe batch of {P} samples")
        self._check_per_class(classes, index is not None, batch)
        label_parts: dict[torch.device, Prepared] = {}  # centered labels on each device that holds a site
        values: list[torch.Tensor] = []
        kept: list[str] = []
        flags = []
        for site, f in features:  # one site at a time: only its float64 copy (and, with a budget, its group) alive
            if f is None:
                raise ValueError(f"alignment: site {site!r} kept no output on the probe pass")
            flat = self._rows(site, f, batch, index)
            if flat is None:
                continue
            kept.append(site)
            F = flat.to(torch.float64)
            p = prepare(F, inplace=F.data_ptr() != f.data_ptr())  # never center the capture itself
            flags += [p.nonfinite, p.degenerate]
            if F.device not in label_parts:
                label_parts[F.device] = prepare(Y.to(F.device))
            py = label_parts[F.device]
            cross = p.Fc.T @ py.Fc
            values.append(torch.dot(cross.reshape(-1), cross.reshape(-1)) / torch.sqrt(p.self_ip * py.self_ip))
            del F, p, cross
        bad = [bool(b) for b in torch.stack([f.cpu() for f in flags]).tolist()]  # the one host sync of a measurement
        if any(bool(p.degenerate) for p in label_parts.values()):
            raise DegenerateKernelError("alignment: the labels of the probe batch center to zero (all the same)")
        records: list[Record] = []
        for i, (site, value) in enumerate(zip(kept, values)):
            nonfinite, degenerate = bad[2 * i], bad[2 * i + 1]
            if nonfinite:
                raise ValueError(f"alignment: site {site!r} has NaN or infinite features at step {batch.step}")
            if degenerate:
                msg = (
                    f"alignment: the features of site {site!r} are the same for every probe sample at step "
                    f"{batch.step} (a dead layer?), so their kernel centers to zero and the alignment is 0/0"
                )
                if self.degenerate == "raise":
                    raise DegenerateKernelError(msg + "; attach with degenerate='skip' to leave such sites out")
                if site not in self._warned:
                    self._warned.add(site)
                    if batch.context.writes:  # rank 0 only (under FSDP every rank measures)
                        say(msg + "; left out (warned once per site)", RuntimeWarning)
                continue
            records.append(Scalar(f"alignment/{site}/cka", value))
        return records
