"""Hessian-vector products of the mean loss over the probe batch, through the model, chunk by chunk and over ranks.

``H v`` by double backward (Pearlmutter 1994): ``g = d L / d theta`` with its graph, then ``H v = d (g . v) / d
theta``. The probe batch comes in chunks (the session's ``probe_batch_size``); each chunk adds the product of its
summed loss, and the sum is divided by the total weight (samples, kept token positions or output entries:
``probes.functional.hessian.chunk_loss``), so the chunks give exactly the Hessian of the mean over the whole batch.
With one chunk the gradient's graph is kept between products (one backward per product); with several it is
rebuilt per chunk and product, so memory stays that of one chunk's double backward. Attention runs through
``scaled_dot_product_attention``'s math kernel inside the products (the fused kernels have no double backward).
Vectors are float64 (the
Lanczos basis); the products run in the parameters' dtype.

Across ranks (DDP, FSDP2): each rank takes its share of the probe batch (``share``), and the summed products and
weights are all-reduced, so every rank holds the products one process computes (to the rounding of the sum). Under
FSDP2 each product runs inside ``probes.autodiff.fsdp.all_gathered``: every rank holds the whole parameters for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from probes.autodiff.fsdp import all_gathered, units
from probes.autodiff.ntk.ranks import share as share  # the one definition, shared with the NTK and grad_noise
from probes.functional.hessian import EdgeSetting, adam_preconditioner, chunk_loss


@dataclass
class Chunk:
    """One forward's worth of the probe batch: inputs (the batch's convention), labels, attention mask or None."""

    x: Any
    y: torch.Tensor
    mask: torch.Tensor | None = None


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the Hessian is taken over: those with ``requires_grad``, each once, in ``parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


class HessianProducts:
    """``v -> H v`` for the Hessian ``H`` of the mean loss over the probe batch (float64 vectors of length ``n``).

    Args:
        forward: ``x -> output`` with gradients (``batch.context.forward``).
        chunks: this rank's chunks of the probe batch.
        params: the parameters (``trainable(model)``).
        loss: a callable ``(output, y) -> mean loss``, or None (``chunk_loss``'s default).
        label_shift: token labels: the output at ``t`` pairs with the label at ``t + label_shift``.
        distributed: all-reduce the products and weights over the default process group.
        model: the model ``params`` belong to; when it is FSDP2-sharded each product runs inside
            ``all_gathered(model)``, on its whole parameters (every rank calls alike), and no graph is kept between
            products (the gathered parameters are freed after each).
    """

    def __init__(
        self,
        forward: Callable[[Any], torch.Tensor],
        chunks: Sequence[Chunk],
        params: Sequence[nn.Parameter],
        *,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        label_shift: int = 0,
        distributed: bool = False,
        model: nn.Module | None = None,
    ) -> None:
        self.forward, self.chunks, self.params = forward, list(chunks), list(params)
        self.loss, self.label_shift, self.distributed = loss, label_shift, distributed
        self.sharded = model if model is not None and units(model) else None
        self.n = sum(p.numel() for p in self.params)
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.products = 0
        self._kept: list[tuple[tuple[torch.Tensor, ...], float]] | None = None

    def _gradient(self, chunk: Chunk, params: Sequence[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], float]:
        """The gradient of the chunk's summed loss, with its graph, and the chunk's weight."""
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels lack double backward
            out = self.forward(chunk.x)
            total, weight = chunk_loss(out, chunk.y, loss=self.loss, label_shift=self.label_shift, mask=chunk.mask)
            grads = torch.autograd.grad(total, params, create_graph=True, allow_unused=True, materialize_grads=True)
        return grads, weight

    @staticmethod
    def _split(v: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        parts = torch.split(v, [p.numel() for p in params])
        return [part.view_as(p).to(p.dtype) for part, p in zip(parts, params)]

    @staticmethod
    def _chunk_product(
        grads: tuple[torch.Tensor, ...], vs: list[torch.Tensor], params: Sequence[torch.Tensor], retain: bool
    ) -> torch.Tensor:
        hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=retain, allow_unused=True)
        return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, params)])

    def _local(self, v: torch.Tensor, params: Sequence[torch.Tensor], keep: bool) -> torch.Tensor:
        """This rank's summed products and weight: ``[sum_chunks H_c v, sum_chunks weight_c]`` (float64)."""
        vs = self._split(v, params)
        total = torch.zeros(self.n + 1, dtype=torch.float64, device=self.device)
        if keep and self._kept is None:
            self._kept = [self._gradient(self.chunks[0], params)]
        for chunk in self.chunks:
            grads, weight = self._kept[0] if keep and self._kept else self._gradient(chunk, params)
            if any(g.requires_grad for g in grads):
                total[:-1] += self._chunk_product(grads, vs, params, retain=keep).to(torch.float64)
            total[-1] += weight
        return total

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` (float64, length ``n``)."""
        v = v.to(self.device)
        if self.sharded is None:
            total = self._local(v, self.params, keep=len(self.chunks) == 1)
        else:
            with all_gathered(self.sharded):  # the whole parameters, in the same order as the shards
                total = self._local(v, trainable(self.sharded), keep=False)
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(total)
        self.products += 1
        return total[:-1] / total[-1].clamp_min(1.0)

    def release(self) -> None:
        """Drop the kept graph (after the last product)."""
        self._kept = None


def preconditioned(products: Callable[[torch.Tensor], torch.Tensor], d: torch.Tensor) -> Callable:
    """``v -> D^-1/2 H D^-1/2 v`` for a diagonal ``D`` given as the float64 vector ``d``."""
    scale = d.rsqrt()
    return lambda v: scale * products(scale * v)


def adam_diagonal(optimizer: Any, params: Sequence[nn.Parameter], setting: EdgeSetting) -> torch.Tensor | str:
    """Adam's preconditioner ``D`` over ``params`` (flattened, float64) from the optimizer's own state, or why not.

    Args:
        optimizer: an Adam or AdamW optimizer.
        params: the parameters, in the Hessian's order.
        setting: its ``EdgeSetting`` (``beta2``, ``eps``, ``amsgrad``).

    Returns:
        ``D``, or a sentence: before the first step there is no ``exp_avg_sq``; a parameter the optimizer does not
        update has none either.
    """
    key = "max_exp_avg_sq" if setting.amsgrad else "exp_avg_sq"
    beta2, eps = setting.beta2, setting.eps
    parts = []
    for p in params:
        state = optimizer.state.get(p, {})
        if key not in state:
            return f"the optimizer has no {key} for every trainable parameter yet (before its first step?)"
        step = float(state["step"])
        second = _whole(state[key].detach())  # FSDP2: the shard of a DTensor state, gathered (every rank alike)
        if beta2 is None or eps is None:
            raise ValueError("adam_diagonal: the setting has no Adam beta2 and eps (an SGD setting?)")
        parts.append(adam_preconditioner(second.reshape(-1), step, beta2, eps))
    return torch.cat(parts).to(params[0].device)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A ``DTensor``'s whole value (an all-gather), any other tensor as it is."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t
