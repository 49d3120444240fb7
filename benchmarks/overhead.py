"""Training-step overhead of probes, as ratios against the plain step in the same run.

Model: the seed-003 784-750-320-50-10 ReLU MLP (one shared nn.ReLU called 4 times), batch 64, SGD.
Cases: no probes (anchor); ``relu_zeros`` attached (passive, counts every forward);
active probes attached but not due (only ``session.step()`` runs); and the same MLP
written with ``F.relu`` in ``forward``, without and with ``relu_zeros`` (the cost of
catching functional calls with a TorchFunctionMode).

    python benchmarks/overhead.py [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import statistics  # noqa: E402

from _timing import paired_ratios, samples, table  # noqa: E402

import probes  # noqa: E402


class SeedMLP(nn.Module):
    """The seed-003 net: one shared nn.ReLU applied after each of the four Linears (logits too)."""

    def __init__(self, sizes=(784, 750, 320, 50, 10), functional: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = nn.ReLU()
        self.functional = functional

    def forward(self, x):
        for layer in self.layers:
            x = F.relu(layer(x)) if self.functional else self.act(layer(x))
        return x


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, session=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if session is not None:
            session.step()

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, repeat = (60, 10) if not (args.quick or args.smoke) else ((20, 10) if args.quick else (2, 2))
    torch.manual_seed(0)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    probe_x, probe_y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    active = [n for n in ("patterns", "pathgram", "alignment", "ntk", "margin", "linear_region")
              if n in {i.name for i in probes.available()}]

    def model(functional: bool = False) -> nn.Module:
        torch.manual_seed(1)
        return SeedMLP(functional=functional)

    m_plain, m_rz, m_idle, m_f, m_frz = model(), model(), model(), model(True), model(True)
    s_rz = probes.attach(m_rz, {"relu_zeros": {"every": 100}}, sinks=["memory"])
    idle_spec = {n: {"every": 10**9} for n in active}
    s_idle = probes.attach(m_idle, idle_spec, probe_data=(probe_x, probe_y), sinks=["memory"]) if active else None
    s_frz = probes.attach(m_frz, {"relu_zeros": {"every": 100}}, sinks=["memory"])
    cases = {
        "plain step": make_step(m_plain, x, y),
        "relu_zeros attached": make_step(m_rz, x, y, s_rz),
        "active probes, not due": make_step(m_idle, x, y, s_idle),
        "F.relu model, plain": make_step(m_f, x, y),
        "F.relu model + relu_zeros": make_step(m_frz, x, y, s_frz),
    }
    measured = samples(cases, rounds=rounds, repeat=repeat)
    times = {name: statistics.median(v) for name, v in measured.items()}
    ratios = paired_ratios(measured, "plain step")
    print(table(times, "plain step", f"training step, 784-750-320-50-10 MLP, batch 64, "
                f"{torch.get_num_threads()} threads (median of {rounds} interleaved rounds x {repeat} steps; "
                "ratios: median of the per-round ratios)", ratios=ratios))
    fr = paired_ratios(measured, "F.relu model, plain")["F.relu model + relu_zeros"]
    print(f"functional capture: {fr:.3f}x the same F.relu model without probes")
    print(f"not-due active probes: {', '.join(active) or '(none available)'}")
    for s in (s_rz, s_idle, s_frz):
        if s is not None:
            s.close()
    return times


if __name__ == "__main__":
    main()
