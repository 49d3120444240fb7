"""On a CUDA device: passive counting never syncs with the host, results match the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SharedReluMLP

import probes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_relu_zeros_hot_path_does_not_sync():
    torch.manual_seed(0)
    model = SharedReluMLP(sizes=(32, 64, 64, 64, 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    session = probes.attach(model, {"relu_zeros": {"every": 1000}}, sinks=["memory"])
    x = torch.randn(128, 32, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    model(x)  # first forward discovers the sites
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            session.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    session.close()
    assert 0.0 <= session.memory.last("relu_zeros/total/fraction") <= 1.0


def test_cuda_counts_equal_cpu_counts():
    torch.manual_seed(0)
    cpu = SharedReluMLP()
    gpu = SharedReluMLP().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(50, 12)
    results = []
    for model, xx in ((cpu, x), (gpu, x.cuda())):
        s = probes.attach(model, {"relu_zeros": {"every": 1}}, sinks=["memory"])
        model(xx)
        s.step()
        s.close()
        results.append(s.memory.last("relu_zeros/act#1/zeros"))
    assert results[0] == results[1]


def test_all_builtin_probes_run_on_cuda():
    names = [i.name for i in probes.available() if i.source == "builtin"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)).cuda()
    px = torch.randn(24, 8, device="cuda")
    py = torch.sign(px[:, :1])
    s = probes.attach(model, {n: {"every": 1} for n in names}, probe_data=(px, py), sinks=["memory"], strict=True)
    model(px)
    s.step()
    s.close()
    assert {t.split("/")[0] for t in s.memory.tags()} >= set(names)
