"""The one resume rule: a run that resumes writes no second step-0 point.

The step-0 point is the at-attach measurement (``attach(measure_at_attach=True)``, the initialization). Its records
are held back until the session is first used (``Output.pending``); loading a state before then (``attach(state=...)``
or ``Session.load_state_dict`` right after ``attach``) drops them and counts every active probe as measured at the
loaded step, so ``close()`` measures only those measured since. A state given at attach is known before the
measurement, so that measurement is not even run (``measures_at_attach``). The integrations resume through the same
rule: they hand the trainer's step in the state (``state_at``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["measures_at_attach", "state_at", "check_state"]


def measures_at_attach(asked: bool, state: Mapping[str, Any] | None) -> bool:
    """Whether ``attach`` measures the initialization: asked for, and not resuming (no state)."""
    return bool(asked) and state is None


def state_at(state: Mapping[str, Any] | None, step: int) -> dict[str, Any] | None:
    """The state a framework's run resumes from at the trainer's ``step``: ``state`` with that step (its probe
    state kept), ``{"step": step}`` without one after step 0, or None for a fresh run (step 0, no state)."""
    if state is not None:  # an empty state too: a resumed run, measured from its step on
        return {**state, "step": int(step)}
    return {"step": int(step)} if step != 0 else None


def check_state(state: Any) -> None:
    """Raise ``ValueError`` unless ``state`` is what ``Session.state_dict()`` returned (a mapping with ``step``)."""
    if not isinstance(state, Mapping) or "step" not in state:
        raise ValueError("load_state_dict: expected what Session.state_dict() returned (a dict with 'step')")
