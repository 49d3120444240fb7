"""Per-sample gradients of a loss through the model, summed over samples in chunks, and the sums across ranks.

``sample_gradient_sums`` runs ``torch.func.vmap(grad(loss of one sample))`` with ``functional_call`` over chunks of
the samples (``route="vmap"``), or one ``torch.autograd.grad`` per sample (``route="loop"``, for models that
``vmap`` cannot trace); only the sums of ``probes.functional.grad_noise.GradientSums`` are kept, never a
``samples x parameters`` matrix beyond one chunk. Under ``torch.distributed`` each rank takes a contiguous share of
the samples and ``all_reduce_sums`` adds the sums of every rank (one all-reduce) and gathers the per-sample norms; under
FSDP2 the per-sample gradients are taken of the whole parameters, gathered for the blocks (``all_gathered``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from probes.autodiff.fsdp import all_gathered
from probes.autodiff.ntk.ranks import share as share  # the one definition, shared with the NTK and the Hessian
from probes.functional.grad_noise import GradientSums

#: ``route``: vectorised per-sample gradients, or one backward per sample
ROUTES = ("vmap", "loop")

#: the loss of a block of samples: ``(output, target, weight) -> sum of the samples' losses``
BlockLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters with ``requires_grad``, by name (tied parameters once)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _vmap_block(
    module: nn.Module, args: tuple[torch.Tensor, ...], target: torch.Tensor, weight: torch.Tensor, loss: BlockLoss
) -> dict[str, torch.Tensor]:
    params = {n: p.detach() for n, p in trainable(module).items()}
    rest = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    rest.update(dict(module.named_buffers()))

    def one(p: dict[str, torch.Tensor], xs: tuple[torch.Tensor, ...], t: torch.Tensor, w: torch.Tensor) -> Any:
        out = functional_call(module, {**p, **rest}, tuple(a.unsqueeze(0) for a in xs))
        return loss(out, t.unsqueeze(0), w.unsqueeze(0))

    with warnings.catch_warnings():
        # torch's "performance drop ... batching rule" warnings (attention under vmap) are about this computation
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return vmap(grad(one), in_dims=(None, 0, 0, 0))(params, args, target, weight)


def _loop_block(
    module: nn.Module, args: tuple[torch.Tensor, ...], target: torch.Tensor, weight: torch.Tensor, loss: BlockLoss
) -> dict[str, torch.Tensor]:
    params = trainable(module)
    names, tensors = list(params), list(params.values())
    rows: list[tuple[torch.Tensor | None, ...]] = []
    for i in range(int(target.shape[0])):
        value = loss(module(*(a[i : i + 1] for a in args)), target[i : i + 1], weight[i : i + 1])
        rows.append(torch.autograd.grad(value, tensors, allow_unused=True))
    out = {}
    for k, (name, p) in enumerate(zip(names, tensors)):
        out[name] = torch.stack([g if (g := r[k]) is not None else torch.zeros_like(p) for r in rows])
    return out


def sample_gradient_sums(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    target: torch.Tensor,
    weight: torch.Tensor,
    loss: BlockLoss,
    chunk: int,
    route: str = "vmap",
) -> GradientSums:
    """Sums over samples of the per-sample gradients of ``loss`` w.r.t. the trainable parameters of ``module``.

    Args:
        module: ``module(*args)`` is the output the loss takes (samples first).
        args: positional inputs, samples along the first axis.
        target: per-sample targets, samples first.
        weight: per-sample weights handed to ``loss`` (token weights; any ``(P, ...)`` tensor otherwise).
        loss: ``(output, target, weight) -> summed loss`` of a block of samples.
        chunk: samples per vectorised block.
        route: ``"vmap"`` or ``"loop"``.

    Returns:
        The sums, keyed by ``module``'s parameter names.

    Under FSDP2 the blocks run inside ``probes.autodiff.fsdp.all_gathered(module)``: the per-sample gradients are
    those of the whole parameters, on every rank.
    """
    sums = GradientSums()
    P = int(target.shape[0])
    block = _vmap_block if route == "vmap" else _loop_block
    with torch.enable_grad(), all_gathered(module):  # FSDP2: the whole parameters (every rank calls alike)
        for start in range(0, P, max(1, chunk)):
            stop = min(P, start + max(1, chunk))
            part = tuple(a[start:stop] for a in args)
            sums.add(block(module, part, target[start:stop], weight[start:stop], loss))
    return sums


def all_reduce_sums(
    sums: GradientSums, shapes: dict[str, torch.Size], device: torch.device, P: int, world: int
) -> GradientSums:
    """The sums of every rank added on every rank (one all-reduce of ``n``, ``s`` and ``q``), and the per-sample norms
    of every rank in rank order (one all-gather, padded to ``ceil(P / world)``).

    Args:
        sums: this rank's sums (an empty share has none: zeros are sent).
        shapes: parameter name -> shape, in the same order on every rank.
        device: where the collectives run (the model's device).
        P: all samples.
        world: the ranks.

    Returns:
        The sums over all ranks.
    """
    dist = torch.distributed
    names = list(shapes)

    def part(store: dict[str, torch.Tensor], k: str) -> torch.Tensor:
        if k in store:
            return store[k].reshape(-1).to(device)
        return torch.zeros(shapes[k].numel(), dtype=torch.float64, device=device)

    flat = torch.cat(
        [torch.tensor([float(sums.n)], dtype=torch.float64, device=device)]
        + [part(sums.total, k) for k in names]
        + [part(sums.squares, k) for k in names]
    )
    dist.all_reduce(flat)
    out = GradientSums(n=int(round(float(flat[0]))))
    at = 1
    for store in (out.total, out.squares):
        for k in names:
            size = shapes[k].numel()
            store[k] = flat[at : at + size].reshape(shapes[k])
            at += size
    S = -(-P // world)
    mine = sums.sample_norms().to(device)
    padded = torch.full((S + 1,), -1.0, dtype=torch.float64, device=device)
    padded[: mine.numel()] = mine
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    norms = torch.cat(gathered)
    out.norms = [norms[norms >= 0]]
    return out
