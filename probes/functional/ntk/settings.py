"""Memory budgets and switches of the NTK code: one frozen ``NTKSettings``, passed down the calls as an argument.

The budgets trade memory for fewer, larger blocks; the switches choose a route (tests use them to run every
route). ``DEFAULT`` is what every function takes when it is given none; ``dataclasses.replace(DEFAULT, ...)``
makes another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class NTKSettings:
    """The tunables of one NTK computation.

    Attributes:
        fallback_budget: bytes of fallback Jacobians (all samples) of one parameter group; also the cap on
            per-sample gradients ``D``.
        fallback_chunk_bytes: bytes of one chunk of per-sample Jacobians in the fallback (its default chunk).
        strip_bytes: bytes of the temporaries of one row strip of the layerwise products (the strip height).
        fast_chunk: default samples per forward/backward of the layerwise path (lowered for layers with many
            positions).
        factor_chunk_bytes: bytes of the recorded factors of one forward/backward chunk (sets the chunk when
            ``fast_chunk`` is too many).
        cpu_factor_chunk_bytes: the same on the CPU: smaller, because temporaries of tens of MB come as fresh
            pages from the operating system at every allocation, and the page faults cost more than the
            arithmetic on them.
        output_block_bytes: bytes of the temporaries of one block of outputs (norm layers' ``g * xhat``).
        batched_grads: one backward pass vectorised over the outputs (``is_grads_batched``) instead of one per
            output.
        pairs_method: how a layer is contracted: ``"auto"`` (fewer operations), ``"pairs"`` or ``"outer"``.
        compress_ratio: a factor's feature axis is compressed when its numerical rank is at most this fraction
            of its length.
        compress_max: longest feature axis tried for compression (its Gram's eigh costs about ``10 m^3``).
    """

    fallback_budget: int = 1 << 30
    fallback_chunk_bytes: int = 1 << 27
    strip_bytes: int = 1 << 28
    fast_chunk: int = 2048
    factor_chunk_bytes: int = 1 << 28
    cpu_factor_chunk_bytes: int = 1 << 24
    output_block_bytes: int = 1 << 23
    batched_grads: bool = True
    pairs_method: Literal["auto", "pairs", "outer"] = "auto"
    compress_ratio: float = 0.75
    compress_max: int = 4096

    def __post_init__(self) -> None:
        if self.pairs_method not in ("auto", "pairs", "outer"):
            raise ValueError(f"NTKSettings: pairs_method must be 'auto', 'pairs' or 'outer', got {self.pairs_method!r}")


#: the settings every NTK function uses when it is given none
DEFAULT = NTKSettings()
