"""``weightnorm``: per-layer weight and gradient norms, a third-party probe for ``probes``.

For every module that owns parameters directly (``nn.Linear``, ``nn.Conv2d``, a norm layer, ...) at
path ``<layer>``:

- ``weightnorm/<layer>/weight``: ``sqrt(sum_p ||p||_F^2)`` over the module's own parameters
  (weight and bias; ``bias=False`` leaves biases out);
- ``weightnorm/<layer>/grad``: the same norm of their ``.grad``, and ``weightnorm/<layer>/grad_to_weight``
  the ratio (the relative size of one SGD step divided by the learning rate);
- ``weightnorm/total/weight`` and ``weightnorm/total/grad`` over every parameter.

Which gradient: the probe reads ``p.grad`` when it measures; it never runs a backward itself (the
probe pass runs without gradients). With ``probes.attach(..., optimizer=opt)`` the session steps
from a hook that runs right after ``opt.step()``, so ``p.grad`` is the gradient that step just used;
in a hand-written loop call ``session.step()`` before ``opt.zero_grad()`` to see it (after
``zero_grad()`` the gradients are ``None`` and the ``grad`` tags are left out for that step, as they
are at attach, step 0). With the Lightning callback it is the last step's gradient as well. Under DDP
the gradients are already averaged over ranks. Parameters without a gradient are left out of the
gradient norms.

Norms are computed on the parameters' device and leave it in one transfer (the session stacks the
scalars). Options: ``bias`` (True), ``grads`` (True), ``modules`` (fnmatch patterns of module paths;
default all).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch

import probes
from probes.records import Scalar

__version__ = "0.1.0"


class WeightNorm(probes.Probe):
    """Per-layer weight and gradient norms (reads ``p.grad`` as the optimizer left it)."""

    name = "weightnorm"
    description = "per-layer weight and gradient norms (example third-party plugin)"
    every = 10
    passive = False
    needs_probe_data = False

    def __init__(self, bias: bool = True, grads: bool = True, modules: Sequence[str] | str | None = None) -> None:
        self.bias = bool(bias)
        self.grads = bool(grads)
        self.patterns = [modules] if isinstance(modules, str) else list(modules) if modules is not None else None
        self.layers: list[tuple[str, list[torch.nn.Parameter]]] = []

    def setup(self, context: probes.Context) -> None:
        layers = []
        for path, module in context.model.named_modules():
            params = [p for n, p in module.named_parameters(recurse=False) if self.bias or not n.startswith("bias")]
            if not params:
                continue
            label = path or "root"
            if self.patterns is not None and not any(fnmatch.fnmatchcase(label, pat) for pat in self.patterns):
                continue
            layers.append((label, params))
        if not layers:
            raise ValueError(
                f"weightnorm: model {type(context.model).__name__} has no parameters"
                f"{' matching ' + repr(self.patterns) if self.patterns is not None else ''}"
            )
        self.layers = layers

    def measure(self, batch: probes.ProbeBatch) -> list[Scalar]:
        records: list[Scalar] = []
        total_w, total_g = [], []
        for label, params in self.layers:
            w2 = torch.stack([p.detach().double().pow(2).sum() for p in params]).sum()
            records.append(Scalar(f"weightnorm/{label}/weight", w2.sqrt()))
            total_w.append(w2)
            if not self.grads:
                continue
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            g2 = torch.stack([g.detach().double().pow(2).sum() for g in grads]).sum()
            records.append(Scalar(f"weightnorm/{label}/grad", g2.sqrt()))
            records.append(Scalar(f"weightnorm/{label}/grad_to_weight", g2.sqrt() / w2.sqrt().clamp_min(1e-300)))
            total_g.append(g2)
        records.append(Scalar("weightnorm/total/weight", torch.stack(total_w).sum().sqrt()))
        if total_g:
            records.append(Scalar("weightnorm/total/grad", torch.stack(total_g).sum().sqrt()))
        return records


@probes.hookimpl
def probes_add_probes() -> list[type[probes.Probe]]:
    return [WeightNorm]
