"""``margin``: how many probe samples are not yet fitted with margin ``m``, the force ``Delta_i = m - y_i f(x_i)``
(seed 002; jamming, Geiger et al. 2019).

The probe class: labels (binary, classes, token labels), the weight count ``N``. What it measures, its tags,
options and cost: ``docs/probes/margin.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from probes.builtin._narrow import labels, output
from probes.builtin._tokens import token_pairs
from probes.functional.labels import POSITIONS, is_token_labels, token_rows
from probes.functional.margin import forces
from probes.options import MAX_BINS, choice, integer, number, option
from probes.probe import Needs, Probe, ProbeBatch
from probes.records import Histogram, Record, Scalar


def count_weights(model: nn.Module) -> int:
    """Trainable parameters without biases (names whose last part starts with ``bias`` are left out)."""
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.requires_grad and not n.rsplit(".", 1)[-1].startswith("bias")
    )


class Margin(Probe):
    """Forces ``Delta = m - y f(x)`` on the probe batch: ``N_Delta``, per sample and per weight, hinge loss."""

    name = "margin"
    description = "samples not yet fitted with a margin (jamming): count, share, loss"
    every = 10
    passive = False
    needs = Needs(labels=True, probe_data=True)

    @dataclass(frozen=True)
    class Options:
        margin: float = option(0.5, number, minimum=0.0, doc="the margin m of Delta = m - y f(x)")
        bins: int = option(64, integer, minimum=1, maximum=MAX_BINS, doc="bins of the histogram of Delta")
        n_weights: int | None = option(
            None, integer, minimum=1, maximum=2**63 - 1, optional=True, doc="N (default: the trainable weights)"
        )
        positions: str = option("all", choice, allowed=POSITIONS, doc="token labels: every kept position or the last")

    def check(self, batch: ProbeBatch) -> None:
        """A model with trainable weights (or ``n_weights``); labels of the kind and range the model's output width
        needs (binary +-1 or two classes for one output, integer class indices ``0..C-1`` for ``C`` outputs),
        checked on the at-attach output."""
        if self.n_weights is None and count_weights(batch.model) == 0:
            raise ValueError("margin: the model has no trainable weights (without biases); pass n_weights=N")
        if batch.output is not None:
            self.forces(batch)

    def forces(self, batch: ProbeBatch) -> torch.Tensor:
        """The forces on the probe batch: one per sample, or one per kept position for token labels ``(P, T)``.

        Args:
            batch: the probe batch (its output, labels, ``label_shift`` and attention mask).

        Returns:
            ``Delta``, float64, one per sample or kept position.

        Raises:
            ValueError: labels that do not fit the output (see ``forces``); token labels with an output that has no
                value per position.
        """
        y = labels("margin", batch)
        if not is_token_labels(y):
            return forces(output("margin", batch), y, self.margin)
        out = batch.output
        if not isinstance(out, torch.Tensor) or out.ndim != 3 or tuple(out.shape[:2]) != tuple(y.shape):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"margin: token labels {tuple(y.shape)} need an output (P, T, C) of logits per "
                f"position, but the model output is {shape}; pick the per-position logits with "
                "attach(output=...), or pass one label per sample"
            )
        index, yk = token_pairs("margin", batch, self.positions, notice=True)
        return forces(token_rows(out, index), yk, self.margin)

    def measure(self, batch: ProbeBatch) -> list[Record]:
        delta = self.forces(batch)
        P = delta.numel()
        N = self.n_weights if self.n_weights is not None else count_weights(batch.model)
        n_delta = (delta > 0).sum().to(torch.float64)
        loss = 0.5 * delta.clamp(min=0).square().mean()
        return [
            Scalar("margin/n_delta", n_delta),
            Scalar("margin/n_delta_fraction", n_delta / P),
            Scalar("margin/n_delta_per_weight", n_delta / N),
            Scalar("margin/loss", loss),
            Histogram.of("margin/delta", delta, bins=self.bins),
        ]
