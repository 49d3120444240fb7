"""Token labels as samples for the probes that take them (``alignment``, ``margin``): the kept
``(sample, position)`` pairs of the probe batch, with the notice about labelled padding said once."""

from __future__ import annotations

import torch

from probes.engine.failures import ProbesNoticeWarning, say
from probes.functional.labels import IGNORE_INDEX, padded_labels, token_positions
from probes.probe import ProbeBatch


def token_pairs(
    who: str, batch: ProbeBatch, positions: str, said: set[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(sample, position)`` pairs of the token labels that are samples, and their labels
    (``probes.functional.labels.token_positions`` with the batch's ``label_shift`` and attention mask: a pair whose
    feature position or label position is padding is left out, like a ``-100`` label).

    Args:
        who: the probe's name, for messages.
        batch: the probe batch, with token labels ``(P, T)``.
        positions: ``"all"`` or ``"last"``.
        said: the probe's set of notices said; when given, labelled positions that the attention mask leaves out
            (``labels = input_ids`` with the pads not set to ``-100``) are said once (key ``"padding"``).

    Returns:
        ``(index, y)``: ``index`` ``(N, 2)`` long, ``y`` the ``N`` paired labels.

    Raises:
        ValueError: as ``token_positions``, naming the probe and the options that change the pairing.
    """
    if said is not None and "padding" not in said:
        n = padded_labels(batch.y, batch.label_shift, batch.mask)
        if n:
            said.add("padding")
            say(
                f"{who}: {n} labelled position(s) of the token labels pair with padding (attention mask 0, "
                f"label_shift={batch.label_shift}) and are left out, as if labelled {IGNORE_INDEX} (said once)",
                ProbesNoticeWarning,
            )
    try:
        return token_positions(batch.y, batch.label_shift, positions, batch.mask)
    except ValueError as exc:
        raise ValueError(
            f"{who}: {exc} (token labels {tuple(batch.y.shape)} with attach(label_shift="
            f"{batch.label_shift}), option positions={positions!r}; every position labelled "
            f"{IGNORE_INDEX} is left out)"
        ) from None
