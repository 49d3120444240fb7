"""Out-of-suite check: timm's ViT-tiny (32 px, patch 4) through the NTK's layerwise path, against torch.func.

timm is not a dependency and its import needs torchvision, which does not install beside the CPU torch here: a
stub module stands in for torchvision (nothing of it is used by a ViT). Run it with timm on the path:

    pip install --no-deps --target /tmp/timmpkg timm
    PYTHONPATH=/tmp/timmpkg .venv/bin/python scripts/check_timm_vit.py

It prints the plan's fallback reasons (none) and the relative errors of the trace and the top eigenvalue.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

import torch
from torch.func import functional_call, jacrev, vmap


class _Named(type):
    """A stand-in class whose attributes are their own names (``InterpolationMode.NEAREST``)."""

    def __getattr__(cls, attr: str) -> str:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return attr


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``torchvision`` and its submodules as empty packages whose names are stand-in classes."""

    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def stand_in(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Named(attr, (torch.nn.Module,), {})

        module.__getattr__ = stand_in
        return module

    def exec_module(self, module) -> None:
        pass


def main() -> None:
    sys.meta_path.insert(0, _TorchvisionStub())
    import timm

    from probes.functional.ntk import empirical_ntk, ntk_plan

    torch.manual_seed(0)
    model = (
        timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10)
        .double()
        .eval()
    )
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    plan = ntk_plan(model, x)
    print("fallback reasons:", plan.reasons or "none", "| fallback parameters:", len(plan.fallback))
    kernel = empirical_ntk(model, x, mode="trace", dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    flat = torch.cat([j.reshape(x.shape[0], 10, -1) for j in jac.values()], dim=2)
    reference = torch.einsum("aci,bci->ab", flat, flat)
    top, top_ref = torch.linalg.eigvalsh(kernel)[-1], torch.linalg.eigvalsh(reference)[-1]
    print(
        f"trace relative error {float((kernel.trace() - reference.trace()).abs() / reference.trace()):.2e}, "
        f"top eigenvalue relative error {float((top - top_ref).abs() / top_ref):.2e}"
    )


if __name__ == "__main__":
    main()
