"""The probe contract: one ``Needs`` declaration, one ``check`` at attach, a batch of data with its context, options
as a dataclass; and the old contract's flags and hooks, adapted or refused with an error that says what to change."""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import probes
from probes import legacy
from probes.engine.failures import ProbesNoticeWarning
from probes.options import choice, integer, option
from probes.probe import Needs, Probe, ProbeBatch, ProbeContext
from probes.records import Scalar
from probes.testing import check_contract, probe_batch


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, generator=g), torch.arange(6) % 2


class Fired(Probe):
    """Fraction of open gates per site, on the shared pass and on a pass of its own (new contract)."""

    name = "fired"
    description = "fraction of open gates"
    every = 1
    needs = Needs(sites={"gate"}, labels=True)

    @dataclass(frozen=True)
    class Options:
        scale: int = option(1, integer, minimum=1, doc="a factor")
        mode: str = option("shared", choice, allowed=("shared", "own"), doc="which pass")

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.checked: list[tuple[bool, bool]] = []
        self.optimizers: list[object] = []

    def check(self, batch: ProbeBatch) -> None:
        self.checked.append((batch.output is not None, batch.y is not None))
        if batch.output is not None and batch.output.shape[1] < 2:
            raise ValueError("fired: the model needs two outputs")

    def measure(self, batch: ProbeBatch) -> list[Scalar]:
        acts = batch.activations
        if self.options.mode == "own":
            acts = batch.context.run(batch.x, keep=lambda site: frozenset({"gate"})).activations
        batch.context.notice("hello", "fired: said once")
        self.optimizers.append(batch.context.optimizer)
        without = batch.context.forward(batch.x, grad=False)
        assert not without.requires_grad and torch.equal(without, batch.output)
        return [Scalar(f"fired/{n}/open", a.gate.double().mean() * self.scale) for n, a in acts.items()]


def test_a_new_style_probe_measures_checks_once_and_says_a_notice_once() -> None:
    model, (x, y) = mlp(), data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Fired(scale=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = probes.attach(model, [probe], probe_data=(x, y), sinks=["memory"], optimizer=opt, strict=True)
        for _ in range(3):
            s.step()
        s.close()
    assert probe.checked == [(True, True)]  # once, on the at-attach pass
    assert [str(w.message) for w in caught if issubclass(w.category, ProbesNoticeWarning)].count(
        "fired: said once"
    ) == 1
    assert probe.optimizers and all(o is opt for o in probe.optimizers)
    expected = float((model[0](x) > 0).double().mean()) * 2
    assert s.memory.last("fired/1/open") == pytest.approx(expected)


def test_the_own_pass_reads_the_same_gates() -> None:
    model, (x, y) = mlp(), data()
    s = probes.attach(model, [Fired(mode="own")], probe_data=(x, y), sinks=["memory"], strict=True)
    s.close()
    assert s.memory.last("fired/1/open") == pytest.approx(float((model[0](x) > 0).double().mean()))


def test_options_are_one_checked_object_named_in_the_signature() -> None:
    assert list(inspect.signature(Fired).parameters) == ["scale", "mode"]
    probe = Fired(mode="own")
    assert probe.options == Fired.Options(scale=1, mode="own") and probe.scale == 1
    with pytest.raises(ValueError, match=r"fired: option 'scale' must be a positive int, got 0"):
        Fired(scale=0)
    with pytest.raises(TypeError, match=r"fired: option 'mode' must be one of 'shared', 'own', got 3"):
        Fired(mode=3)
    with pytest.raises(TypeError, match=r"probe 'fired'.*'colour'.*it accepts: every, scale, mode"):
        probes.attach(mlp(), {Fired: {"colour": "red"}}, probe_data=data())
    assert probes.options.described(Fired.Options) == [("scale", 1, "a factor"), ("mode", "shared", "which pass")]


def test_declared_labels_are_checked_once_by_the_engine() -> None:
    with pytest.raises(ValueError, match=r"^fired: this probe needs labels; pass probe_data=\(x, y\)"):
        probes.attach(mlp(), [Fired()], probe_data=data()[0])


def test_check_raises_at_attach_naming_the_probe() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
    for measure_at_attach in (True, False):
        with pytest.raises(ValueError, match="fired: the model needs two outputs"):
            probes.attach(model, [Fired()], probe_data=data(), measure_at_attach=measure_at_attach)
    assert not any(m._forward_hooks for m in model.modules())  # nothing left behind


def test_declared_tensor_input_is_checked() -> None:
    class Flat(Probe):
        name, every = "flat", 1
        needs = Needs(tensor_input=True)

    x = {"input": torch.randn(4, 3)}
    with pytest.raises(TypeError, match="flat: the probe batch x must be one floating tensor with samples first"):
        probes.attach(nn.Linear(3, 2), [Flat()], probe_data=(x, None))


def test_passive_probes_get_a_check_without_a_pass() -> None:
    seen = []

    class Picky(Probe):
        name, passive, every = "picky", True, 1
        needs = Needs(sites={"post"}, probe_data=False)

        def check(self, batch: ProbeBatch) -> None:
            seen.append(batch.output)
            raise ValueError("picky: not this model")

    with pytest.raises(ValueError, match="picky: not this model"):
        probes.attach(mlp(), [Picky()])
    assert seen == [None]


def test_needs_refuses_what_it_cannot_mean() -> None:
    with pytest.raises(ValueError, match=r"sites must be among \['gate', 'post', 'pre'\]"):
        Needs(sites={"inputs"})
    with pytest.raises(ValueError, match="sharding must be one of"):
        Needs(sharding="everything")
    with pytest.raises(TypeError, match="site_types must be nn.Module subclasses"):
        Needs(site_types=(int,))


def test_old_flags_map_onto_needs() -> None:
    class Old(Probe):
        name = "old"
        needs_sites = True
        site_values = frozenset({"gate"})
        site_types = (nn.MaxPool1d,)
        supports_sharding = False

    class OldPassive(Probe):
        name, passive = "old_passive", True
        needs_probe_data = False

    assert Old.needs == Needs(sites={"gate"}, site_types=(nn.MaxPool1d,), sharding=None)
    assert OldPassive.needs == Needs(sites={"pre", "post"}, probe_data=False)
    assert legacy.contract_error(Old, "old") is None
    check_contract(Old)


def test_mixing_the_contracts_is_an_error_that_says_what_to_change() -> None:
    class Both(Probe):
        name = "both"
        needs = Needs(sites={"post"})
        needs_sites = True

    class Hooks(Probe):
        name = "hooks"
        needs = Needs()

        def check(self, batch: ProbeBatch) -> None: ...

        def setup(self, context: probes.Context) -> None: ...

    class Filter(Probe):
        name = "filter"
        needs = Needs(sites={"post"})

        def wants_site(self, site: probes.Site) -> bool:
            return True

    with pytest.raises(TypeError, match=r"probe 'both'.*keep needs and delete the flags.*Needs\(sites=\.\.\.\)"):
        probes.attach(mlp(), [Both], probe_data=data())
    with pytest.raises(TypeError, match=r"probe 'hooks'.*move their checks into check\(batch\)"):
        probes.attach(mlp(), [Hooks], probe_data=data())
    with pytest.raises(TypeError, match=r"probe 'filter'.*rename wants_site to wants"):
        probes.attach(mlp(), [Filter], probe_data=data())
    with pytest.raises(AssertionError, match="keep needs and delete the flags"):
        check_contract(Both)


def test_old_batch_handles_say_what_to_use() -> None:
    class Handles(Probe):
        name, every, needs_probe_data = "handles", 1, True

        def measure(self, batch: ProbeBatch) -> list[Scalar]:
            return [Scalar("handles/runner", 0 if batch.runner is None else 1)]

    with pytest.raises(AttributeError, match=r"ProbeBatch.runner is no longer part of the probe contract; use"):
        probes.attach(mlp(), [Handles()], probe_data=data(), strict=True)


def test_old_batch_reads_keep_working() -> None:
    model, (x, y) = mlp(), data()
    batch = probe_batch(model, x, y)
    assert torch.equal(batch.run().output, batch.output)  # the old ``batch.run``: the probe batch by default
    assert torch.allclose(batch.forward(), batch.output)
    assert (batch.rank, batch.world_size, batch.sharded, batch.writes, batch.label_shift) == (0, 1, False, True, 0)
    assert batch.chunk_size is None and batch.chunk_size == batch.context.chunk_size
    with batch.gathered(model[0]):
        pass


def test_notice_is_said_on_rank_zero_only() -> None:
    model = mlp()
    for rank, expected in ((0, 1), (1, 0)):
        context = ProbeContext(model, rank=rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            context.notice("k", "said")
            context.notice("k", "said")
        assert len(caught) == expected
    shared = ProbeContext(model)
    copied = copy.copy(shared)
    assert copied.rank == 0 and copied.world_size == 1
