"""Real models: any forward signature, outputs that are not one tensor, checkpointing, transforms, other
libraries' activation classes, and saying what a probe cannot see."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers.passive import InputsKept
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils.checkpoint import checkpoint

import probes
from probes import plugins
from probes.engine.session import ProbesNoticeWarning


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.b = nn.Linear(3, 8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, a, b, scale: float = 1.0):
        return self.head(self.act(self.a(a) + self.b(b))) * scale


def reference_ntk_trace(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, ai, bi):
        return functional_call(model, p, (ai[None], bi[None]))[0]

    jac = vmap(jacrev(f), (None, 0, 0))(params, a, b)
    flat = torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], dim=2)
    return torch.einsum("pck,qck->pq", flat, flat)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_two_input_model_gets_patterns_alignment_and_an_exact_ntk(form):
    torch.manual_seed(0)
    model = TwoInputs().double()
    a, b = torch.randn(12, 5, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)
    y = torch.arange(12) % 3
    x = (a, b) if form == "tuple" else {"a": a, "b": b}
    s = probes.attach(model, ["patterns", "alignment", "ntk"], probe_data=(x, y), strict=True)
    s.close()
    assert s.failures == {}
    mem = s.memory
    assert 0 <= mem.last("patterns/act/active_fraction") <= 1
    assert -1 <= mem.last("alignment/output/cka") <= 1
    theta = reference_ntk_trace(model, a, b)
    assert mem.last("ntk/trace") == pytest.approx(float(torch.trace(theta)), rel=1e-10)
    assert mem.last("ntk/eig_max") == pytest.approx(float(torch.linalg.eigvalsh(theta)[-1]), rel=1e-10)


def test_dict_batch_with_labels_inside_and_samples_checked_per_tensor():
    model = TwoInputs()
    a, b, y = torch.randn(6, 5), torch.randn(6, 3), torch.arange(6) % 2
    s = probes.attach(
        model, ["margin"], probe_data={"a": a, "b": b, "labels": y}, label_key="labels", output=lambda out: out[:, :1]
    )
    s.close()
    assert s.failures == {}
    with pytest.raises(ValueError, match=r"x\['b'\] has shape \(5, 3\)"):
        probes.attach(model, ["margin"], probe_data={"a": a, "b": b[:5], "labels": y}, label_key="labels")
    with pytest.raises(KeyError, match="label_key='target'"):
        probes.attach(model, ["margin"], probe_data={"a": a, "b": b, "labels": y}, label_key="target")


class Outputs(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.body(x)
        logits = self.head(h)
        if self.kind == "dict":
            return {"loss": logits.sum(), "logits": logits, "hidden": h}
        if self.kind == "tuple":
            return (logits, h)
        if self.kind == "list_of_str":
            return ["not", "tensors"]
        return logits


@pytest.mark.parametrize(
    "kind, output, width",
    [
        ("dict", None, 2),
        ("tuple", None, 2),
        ("dict", "hidden", 6),
        ("tuple", lambda out: out[1], 6),
    ],
)
def test_outputs_are_picked_by_default_or_by_the_output_option(kind, output, width):
    model = Outputs(kind)
    x, y = torch.randn(8, 4), torch.arange(8) % 2
    s = probes.attach(model, ["alignment", "margin", "linear_region"], probe_data=(x, y), output=output)
    s.close()
    assert s.failures == {}, s.failures
    reference = Outputs("plain")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        picked = reference(x) if width == 2 else reference.body(x)
    Y = F.one_hot(y).double()
    Fc = picked.double() - picked.double().mean(0)
    Yc = Y - Y.mean(0)
    cka = (Fc.T @ Yc).norm() ** 2 / ((Fc.T @ Fc).norm() * (Yc.T @ Yc).norm())
    assert s.memory.last("alignment/output/cka") == pytest.approx(float(cka), rel=1e-6)


def test_an_output_no_probe_can_use_is_an_error_at_attach_naming_the_type_and_the_option():
    with pytest.raises(TypeError, match=r"list of \['str', 'str'\].*output="):
        probes.attach(Outputs("list_of_str"), ["margin"], probe_data=(torch.randn(3, 4), torch.ones(3)))
    with pytest.raises(ValueError, match=r"output='nope'"):
        probes.attach(Outputs("dict"), ["margin"], probe_data=(torch.randn(3, 4), torch.ones(3)), output="nope")


class Blocks(nn.Module):
    def __init__(self, mode: str | None) -> None:
        super().__init__()
        self.mode = mode
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        for i, blk in enumerate(self.blocks):
            if self.mode is not None and i < 2:  # a partial recompute: the last block is not checkpointed
                x = checkpoint(blk, x, use_reentrant=self.mode == "reentrant")
            else:
                x = blk(x)
        return self.head(x)


def hand_count(model: nn.Module, xs: list[torch.Tensor]) -> dict[str, int]:
    """Zeros per ReLU from plain forward hooks on forwards run without checkpointing."""
    counts: dict[str, int] = {}
    mode, model.mode = model.mode, None
    handles = [
        m.register_forward_hook(lambda mod, i, o, n=n: counts.__setitem__(n, counts.get(n, 0) + int((o == 0).sum())))
        for n, m in model.named_modules()
        if isinstance(m, nn.ReLU)
    ]
    with torch.no_grad():
        for x in xs:
            model(x)
    for h in handles:
        h.remove()
    model.mode = mode
    return counts


@pytest.mark.parametrize("mode", [None, "reentrant", "non-reentrant"])
def test_checkpointed_forwards_count_once(mode):
    torch.manual_seed(1)
    model = Blocks(mode)
    xs = [torch.randn(7, 6, requires_grad=True) for _ in range(3)]
    expected = hand_count(model, xs)
    s = probes.attach(model, {"relu_zeros": {"every": 3}})
    for x in xs:
        model(x).sum().backward()
        s.step()
    s.close()
    got = zeros_per_site(s.memory)
    assert got == {k: float(v) for k, v in expected.items()}


def test_wrapped_blocks_keep_the_site_names_of_the_unwrapped_model_and_count_once():
    """``checkpoint_wrapper`` (what FSDP users apply per block) adds ``_checkpoint_wrapped_module`` to the paths."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(1)
    model = Blocks(None)
    xs = [torch.randn(7, 6, requires_grad=True) for _ in range(3)]
    expected = hand_count(model, xs)
    for i in range(2):
        model.blocks[i] = checkpoint_wrapper(model.blocks[i])
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_modules())
    s = probes.attach(model, {"relu_zeros": {"every": 3}})
    for x in xs:
        model(x).sum().backward()
        s.step()
    s.close()
    assert zeros_per_site(s.memory) == {k: float(v) for k, v in expected.items()}  # blocks.0.1, not blocks.0._c...


def test_forwards_under_torch_func_transforms_are_not_observed():
    torch.manual_seed(2)
    model = Blocks(None)
    x = torch.randn(5, 6)
    s = probes.attach(model, {"relu_zeros": {"every": 1}}, strict=True)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi):
        return functional_call(model, p, (xi[None],)).sum()

    per_sample = vmap(grad(loss), (None, 0))(params, x)  # per-sample gradients: no error, no count
    assert per_sample["head.weight"].shape == (5, 1, 6)
    model(x)
    s.step()
    s.close()
    got = zeros_per_site(s.memory)
    assert got == {k: float(v) for k, v in hand_count(model, [x]).items()}


def zeros_per_site(mem) -> dict[str, float]:
    return {t.split("/")[1]: mem.last(t) for t in mem.tags() if t.startswith("relu_zeros/") and t.endswith("/zeros")}


class NewGELUActivation(nn.Module):
    """Named like Hugging Face's GPT-2 activation (the package is not imported)."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x.pow(3))))


class Squash(nn.Module):
    def forward(self, x):
        return x / (1 + x.abs())


def test_other_libraries_activation_classes_and_plugin_declared_ones_are_sites():
    model = nn.Sequential(nn.Linear(4, 8), NewGELUActivation(), nn.Linear(8, 8), Squash(), nn.Linear(8, 2))
    x, y = torch.randn(10, 4), torch.arange(10) % 2
    s = probes.attach(model, ["patterns"], probe_data=(x, y))
    s.close()
    assert {t.split("/")[1] for t in s.memory.tags() if t.endswith("/active_fraction")} == {"1"}

    class Plugin:
        @probes.hookimpl
        def probes_add_activations(self):
            return [Squash]

    plugins.register(Plugin())
    s = probes.attach(model, ["patterns"], probe_data=(x, y))
    s.close()
    assert {t.split("/")[1] for t in s.memory.tags() if t.endswith("/active_fraction")} == {"1", "3"}


def test_a_passive_probe_that_sees_nothing_says_so_once():
    gelu = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    with pytest.warns(ProbesNoticeWarning, match=r"relu_zeros.*gelu x1"):
        s = probes.attach(gelu, {"relu_zeros": {"every": 1}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbesNoticeWarning)
        gelu(torch.randn(3, 4))  # once only: not again at the first training forward
        gelu(torch.randn(3, 4))
    s.close()
    relu = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    s = probes.attach(relu, {"relu_zeros": {"every": 2}})
    relu(torch.randn(3, 4))
    with pytest.warns(ProbesNoticeWarning, match="no training forward.*model.train"):
        s.step(2)
    s.close()


class TinyResNet(nn.Module):
    """Conv-BN-ReLU blocks with an empty nn.Sequential shortcut and one in-place ReLU reused per block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.conv1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.stem(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = self.relu(out)
        return self.head(out.mean(dim=(2, 3)))


def test_chunked_probe_passes_give_the_values_of_one_pass():
    torch.manual_seed(3)
    model = TinyResNet()
    model.train()
    for _ in range(3):  # give BatchNorm running statistics
        model(torch.randn(16, 3, 8, 8))
    x, y = torch.randn(23, 3, 8, 8), torch.arange(23) % 4
    spec = ["patterns", "alignment", "margin", "linear_region"]
    one = probes.attach(model, spec, probe_data=(x, y), probe_batch_size=None, strict=True)
    one.close()
    chunked = probes.attach(model, spec, probe_data=(x, y), probe_batch_size=5, strict=True)
    chunked.close()
    a, b = one.memory, chunked.memory
    assert a.tags() == b.tags() and {"patterns/relu#1/active_fraction", "alignment/relu#2/cka"} <= a.tags()
    for tag in a.scalars():
        assert b.last(tag) == pytest.approx(a.last(tag), rel=1e-5, abs=1e-7), tag
    assert model.training  # modes restored


def test_a_site_without_samples_first_is_a_clear_error_when_chunking():
    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.lin(x).transpose(0, 1)).transpose(0, 1).mean(dim=1)

    x = torch.randn(6, 3, 4)
    with pytest.raises(ValueError, match="samples along the first axis"):  # knowable at attach: raised there
        probes.attach(SequenceFirst(), ["patterns"], probe_data=(x, torch.arange(6) % 2), probe_batch_size=4)
    with pytest.raises(ValueError, match="first axis must be"):  # one pass: the probe itself says what it needs
        probes.attach(SequenceFirst(), ["patterns"], probe_data=(x, torch.arange(6) % 2), probe_batch_size=None)


def test_the_probe_pass_memory_benchmark_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "probe_pass_memory.py"
    out = subprocess.run(
        [sys.executable, str(script), "--smoke", "--sets", "margin"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert "chunks of 4" in out.stdout and "max rel. difference to one pass 0.0e+00" in out.stdout


def test_a_gelu_model_is_reported_at_attach_even_when_it_never_trains():
    gelu = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)).eval()
    with pytest.warns(ProbesNoticeWarning, match=r"relu_zeros.*gelu x1"):
        s = probes.attach(gelu, ["relu_zeros"])
    s.close()


def test_the_default_cadence_benchmark_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "default_cadence.py"
    out = subprocess.run(
        [sys.executable, str(script), "--smoke", "--threads", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert out.stdout.count("x plain training") == 3 and "margin every" in out.stdout, out.stdout


def _torchvision_resnet18() -> nn.Module:
    """``benchmarks/_resnet.py``: a CIFAR ResNet-18 as torchvision writes it (one ``nn.ReLU(inplace=True)`` module
    called twice per block, BatchNorm)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "_resnet.py"
    spec = importlib.util.spec_from_file_location("_resnet_for_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.ResNet18(w=4)


def test_a_torchvision_resnet18_with_in_place_relus_hands_passive_probes_each_input_as_it_was():
    """Each in-place ReLU call's input against a naive forward pre-hook that copies it, and training bit-identical
    with and without the probe (BatchNorm in train mode, SGD with momentum)."""
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(2))

    def train(attach: bool):
        model = _torchvision_resnet18().train()
        naive: list[torch.Tensor] = []
        handles = [
            m.register_forward_pre_hook(lambda _m, args: naive.append(args[0].detach().clone()))
            for m in model.modules()
            if isinstance(m, nn.ReLU)
        ]
        probe = InputsKept()
        session = probes.attach(model, [probe], sinks=["memory"]) if attach else None
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if session is not None:
                session.step()
        if session is not None:
            session.close()
        for h in handles:
            h.remove()
        return model, probe, naive

    plain, _, _ = train(False)
    model, probe, naive = train(True)
    assert len(probe.kept) == len(naive) > 20
    assert any(bool((t < 0).any()) for t in naive)  # the ReLUs had negative inputs to overwrite
    for (name, kept), ref in zip(probe.kept, naive):
        assert torch.equal(kept, ref), name
    assert len({n for n, _ in probe.kept}) > 10  # the reused module's calls are sites of their own (#k)
    for (n, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), n
