"""Memory budgets and switches of the NTK code, read at call time.

Set them here or on ``probes.functional.ntk`` (which forwards to this module): the budgets trade memory for
fewer, larger blocks; the switches choose a route (tests use them to run every route).
"""

from __future__ import annotations

#: bytes of fallback Jacobians (all samples) of one parameter group; also the cap on per-sample gradients D
FALLBACK_BUDGET = 1 << 30
#: bytes of one chunk of per-sample Jacobians in the fallback (sets its default chunk size)
FALLBACK_CHUNK_BYTES = 1 << 27
#: bytes of the temporaries of one row strip of the layerwise products (sets the strip height)
STRIP_BYTES = 1 << 28
#: default samples per forward/backward of the layerwise path (lowered for layers with many positions)
FAST_CHUNK = 2048
#: bytes of the recorded factors of one forward/backward chunk (sets the chunk when FAST_CHUNK is too many)
FACTOR_CHUNK_BYTES = 1 << 28
#: the same on the CPU: smaller, because temporaries of tens of MB come as fresh pages from the operating system
#: at every allocation (glibc maps them), and the page faults cost more than the arithmetic on them
CPU_FACTOR_CHUNK_BYTES = 1 << 24
#: bytes of the temporaries of one block of outputs (norm layers' ``g * xhat``)
OUTPUT_BLOCK_BYTES = 1 << 23
#: one backward pass vectorised over the outputs (``is_grads_batched``) instead of one per output
BATCHED_GRADS = True
#: how a layer is contracted: "auto" (fewer operations), "pairs" or "outer" (for tests)
PAIRS_METHOD = "auto"
#: a factor's feature axis is compressed when its numerical rank is at most this fraction of its length
COMPRESS_RATIO = 0.75
#: longest feature axis tried for compression (its Gram's eigh costs about 10 m^3)
COMPRESS_MAX = 4096

#: the names above: the package ``probes.functional.ntk`` forwards reads and writes of these to this module
TUNABLES = (
    "FALLBACK_BUDGET",
    "FALLBACK_CHUNK_BYTES",
    "STRIP_BYTES",
    "FAST_CHUNK",
    "FACTOR_CHUNK_BYTES",
    "CPU_FACTOR_CHUNK_BYTES",
    "OUTPUT_BLOCK_BYTES",
    "BATCHED_GRADS",
    "PAIRS_METHOD",
    "COMPRESS_RATIO",
    "COMPRESS_MAX",
)
