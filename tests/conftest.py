from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="tensorboard")


class SharedReluMLP(nn.Module):
    """Seed-003 style: one nn.ReLU module called after every hidden layer."""

    def __init__(self, sizes=(12, 10, 8, 6, 3), bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = nn.ReLU()

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


class FunctionalMLP(nn.Module):
    """Calls F.relu / torch.relu / Tensor.relu inside forward, no activation modules."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 9)
        self.b = nn.Linear(9, 7)
        self.c = nn.Linear(7, 2)

    def forward(self, x):
        x = torch.nn.functional.relu(self.a(x))
        x = torch.relu(self.b(x))
        return self.c(x).relu()


@pytest.fixture(autouse=True)
def _fresh_plugins():
    from probes import plugins

    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture
def shared_relu_mlp():
    torch.manual_seed(0)
    return SharedReluMLP()


@pytest.fixture
def functional_mlp():
    torch.manual_seed(0)
    return FunctionalMLP()


def load_script(path, name: str):
    """Import an example or benchmark script (they are not packages) as module ``name``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
