"""Token labels as samples for the probes that take them (``alignment``, ``margin``): the kept
``(sample, position)`` pairs of the probe batch, with the notice about labelled padding said once."""

from __future__ import annotations

import torch

from probes.builtin._narrow import labels
from probes.functional.labels import IGNORE_INDEX, padded_labels, token_positions
from probes.probe import ProbeBatch


def token_pairs(who: str, batch: ProbeBatch, positions: str, notice: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(sample, position)`` pairs of the token labels that are samples, and their labels
    (``probes.functional.labels.token_positions`` with the batch's ``label_shift`` and attention mask: a pair whose
    feature position or label position is padding is left out, like a ``-100`` label).

    Args:
        who: the probe's name, for messages.
        batch: the probe batch, with token labels ``(P, T)``.
        positions: ``"all"`` or ``"last"``.
        notice: say once (``batch.context.notice``, key ``"padding"``) how many labelled positions the attention
            mask leaves out (``labels = input_ids`` with the pads not set to ``-100``).

    Returns:
        ``(index, y)``: ``index`` ``(N, 2)`` long, ``y`` the ``N`` paired labels.

    Raises:
        ValueError: as ``token_positions``, naming the probe and the options that change the pairing.
    """
    shift = batch.context.label_shift
    y = labels(who, batch)
    n = padded_labels(y, shift, batch.mask) if notice else 0
    if n:
        batch.context.notice(
            "padding",
            f"{who}: {n} labelled position(s) of the token labels pair with padding (attention mask 0, "
            f"label_shift={shift}) and are left out, as if labelled {IGNORE_INDEX} (said once)",
        )
    try:
        return token_positions(y, shift, positions, batch.mask)
    except ValueError as exc:
        raise ValueError(
            f"{who}: {exc} (token labels {tuple(y.shape)} with attach(label_shift="
            f"{shift}), option positions={positions!r}; every position labelled "
            f"{IGNORE_INDEX} is left out)"
        ) from None
