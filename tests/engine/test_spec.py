"""Unit tests of ``probes.engine.spec``: what ``attach(probes=..., sinks=...)`` parses (a list, a ``{name: options}``
mapping, ``"auto"``, classes and instances), the errors for unknown and duplicate names and bad options (each naming
the probe), and the checks of the attach options object."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import probes
from probes import plugins
from probes.builtin.patterns import Patterns
from probes.builtin.relu_zeros import ReluZeros
from probes.engine.spec import Options, named, parse_probes
from probes.plugins import UnknownProbeError, sink_class
from probes.probe import Probe
from probes.schedules import at
from probes.sinks.build import plan_sinks


class Own(Probe):
    """A probe of the user's own, given by class or instance."""

    name = "own"
    every = 7

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale


def spec_names(parsed: list[tuple[str, Probe]]) -> list[str]:
    return [name for name, _ in parsed]


# -- what parses ---------------------------------------------------------------------------------------------------


def test_a_list_of_names_gives_probes_in_the_order_given():
    parsed = parse_probes(["relu_zeros", "patterns"], plugins.registry)
    assert spec_names(parsed) == ["relu_zeros", "patterns"]
    assert type(parsed[0][1]) is ReluZeros and type(parsed[1][1]) is Patterns


def test_one_name_is_a_list_of_one():
    parsed = parse_probes("relu_zeros", plugins.registry)
    assert spec_names(parsed) == ["relu_zeros"]
    assert parsed[0][1].bins == 20  # the default


def test_a_mapping_gives_each_probe_its_options_and_every_is_taken_as_the_cadence():
    parsed = parse_probes({"relu_zeros": {"bins": 5, "every": 3}, "patterns": None}, plugins.registry)
    assert spec_names(parsed) == ["relu_zeros", "patterns"]
    relu_zeros = parsed[0][1]
    assert relu_zeros.bins == 5
    assert relu_zeros.every == 3 and "every" in vars(relu_zeros)
    assert "every" not in vars(parsed[1][1])  # left at the class's default cadence


def test_a_schedule_is_a_cadence_option():
    schedule = at([1, 5])
    ((_, probe),) = parse_probes({"relu_zeros": {"every": schedule}}, plugins.registry)
    assert probe.every is schedule


def test_classes_and_instances_are_probes_too():
    mine = Own(scale=2.0)
    parsed = parse_probes({Own: {"scale": 3.0}}, plugins.registry)
    assert spec_names(parsed) == ["own"] and parsed[0][1].scale == 3.0
    parsed = parse_probes([mine, "relu_zeros"], plugins.registry)
    assert spec_names(parsed) == ["own", "relu_zeros"]
    assert parsed[0][1] is mine


def test_auto_gives_every_available_probe_at_its_defaults():
    parsed = parse_probes("auto", plugins.registry)
    available = plugins.available()
    assert spec_names(parsed) == [info.name for info in available]
    assert "relu_zeros" in spec_names(parsed)
    assert all(type(probe) is info.cls for (_, probe), info in zip(parsed, available))
    assert all("every" not in vars(probe) for _, probe in parsed)


def test_a_registered_plugin_probe_parses_by_name():
    class Plugin:
        @probes.hookimpl
        def probes_add_probes(self):
            return [Own]

    plugins.register(Plugin(), name="own-plugin")
    ((name, probe),) = parse_probes({"own": {"scale": 4.0}}, plugins.registry)
    assert name == "own" and isinstance(probe, Own) and probe.scale == 4.0


# -- what is refused -----------------------------------------------------------------------------------------------


def test_an_unknown_name_suggests_the_closest_and_lists_what_is_available():
    with pytest.raises(UnknownProbeError) as info:
        parse_probes(["relu_zero"], plugins.registry)
    message = str(info.value)
    assert message.startswith("unknown probe 'relu_zero'. Did you mean 'relu_zeros'?")
    assert "Available: " in message and "patterns" in message


def test_an_unknown_name_far_from_every_probe_suggests_nothing():
    with pytest.raises(UnknownProbeError, match="^unknown probe 'zzzzzz'. Available: ") as info:
        parse_probes(["zzzzzz"], plugins.registry)
    assert "Did you mean" not in str(info.value)


@pytest.mark.parametrize(
    "spec",
    [["relu_zeros", "relu_zeros"], ["relu_zeros", ReluZeros], [ReluZeros(), "patterns", ReluZeros()]],
    ids=["names", "name-and-class", "instances"],
)
def test_a_probe_given_twice_is_refused_naming_it(spec):
    with pytest.raises(ValueError, match=r"^probe\(s\) \['relu_zeros'\] given more than once$"):
        parse_probes(spec, plugins.registry)


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        (5, "probes must be a list of names or a {name: options} mapping, got int"),
        ([3], "probe names must be strings, got 3"),
        ({"relu_zeros": 3}, "options of probe 'relu_zeros' must be a mapping, got 3"),
    ],
)
def test_a_spec_of_the_wrong_type_is_a_type_error(spec, text):
    with pytest.raises(TypeError) as info:
        parse_probes(spec, plugins.registry)
    assert str(info.value) == text


def test_an_unknown_option_names_the_probe_and_the_option():
    with pytest.raises(TypeError) as info:
        parse_probes({"relu_zeros": {"binz": 3}}, plugins.registry)
    message = str(info.value)
    assert message.startswith("probe 'relu_zeros': ") and "binz" in message
    assert "bins" in message.replace("binz", "")  # what it accepts


def test_a_bad_option_value_names_the_probe_and_the_option():
    with pytest.raises(ValueError, match=r"relu_zeros.*option 'bins'.*got 0"):
        parse_probes({"relu_zeros": {"bins": 0}}, plugins.registry)
    with pytest.raises(TypeError, match=r"relu_zeros.*option 'sites'.*got 3"):
        parse_probes({"relu_zeros": {"sites": 3}}, plugins.registry)


@pytest.mark.parametrize(
    ("every", "error", "text"),
    [
        (0, ValueError, "must be a positive number of steps"),
        (None, TypeError, "must be a positive int or a schedule"),
        (lambda step: step % 10, TypeError, "returned 1 at step 1"),
    ],
    ids=["zero", "none", "int-answer"],
)
def test_a_bad_cadence_is_refused_naming_the_probe_and_every(every, error, text):
    with pytest.raises(error, match="^probe 'relu_zeros': option 'every'") as info:
        parse_probes({"relu_zeros": {"every": every}}, plugins.registry)
    assert text in str(info.value)


def test_an_instance_with_a_bad_cadence_is_refused_naming_it():
    mine = Own()
    mine.every = "often"
    with pytest.raises(TypeError, match="^probe 'own': option 'every'"):
        parse_probes([mine], plugins.registry)


def test_options_given_for_an_instance_are_not_dropped_silently():
    mine = Own()
    try:
        parsed = parse_probes({mine: {"every": 5}}, plugins.registry)
    except (TypeError, ValueError) as exc:  # refusing them, naming the probe, is as good as using them
        assert "'own'" in str(exc)
    else:
        assert parsed[0][1].every == 5


def test_named_prefixes_the_probe_once():
    error = named(ValueError("x must be positive"), "p")
    assert type(error) is ValueError and str(error) == "probe 'p': x must be positive"
    already = ValueError("probe 'p': x must be positive")
    assert named(already, "p") is already


# -- sinks ---------------------------------------------------------------------------------------------------------


def test_an_unknown_sink_name_suggests_the_closest():
    with pytest.raises(UnknownProbeError, match="^unknown sink 'memroy'. Did you mean 'memory'?"):
        parse_sinks(["memroy"])


def test_a_sink_that_is_neither_a_name_nor_a_sink_is_a_type_error():
    with pytest.raises(TypeError, match=r"a sink is a name or a probes.sinks.Sink, got 5"):
        parse_sinks([5])


def test_a_sinks_spec_that_is_not_a_list_names_what_a_sink_is():
    with pytest.raises(TypeError, match=r"a sink is a name or a probes.sinks.Sink, got 5"):
        parse_sinks(5)
    with pytest.raises(TypeError, match=r"attach\(sinks=...\)"):
        probes.attach(nn.Linear(2, 2), [], sinks=5)


def parse_sinks(sinks):
    return plan_sinks(sinks, None, None, sink_class)


# -- the attach options --------------------------------------------------------------------------------------------


def test_the_default_options_are_valid():
    options = Options()
    assert options.strict is False and options.mask == "attention_mask" and options.log_to is None
    assert Options(logdir="runs/x").log_to == "runs/x"

    class Writer:
        def get_logdir(self) -> str:
            return "runs/shared"

    assert Options(writer=Writer()).log_to == "runs/shared"  # the user's writer's folder


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"logdir": "a", "writer": object()}, ValueError, "give logdir= or writer=, not both"),
        ({"optimizer": "sgd"}, TypeError, "attach(optimizer=...) must be a torch.optim.Optimizer, got str"),
        ({"strict": 1}, TypeError, "attach(strict=...) must be True or False, got 1"),
        ({"output": 3}, TypeError, "attach(output=...) must be a key/attribute name or a callable"),
        ({"probe_batch_size": 0}, ValueError, "attach(probe_batch_size=...) must be a positive int or None, got 0"),
        ({"probe_batch_size": True}, ValueError, "attach(probe_batch_size=...)"),
        ({"mask": ""}, TypeError, "attach(mask=...) must be the name of the attention mask"),
        ({"norm_stats": "train"}, ValueError, "attach(norm_stats=...) must be 'running'"),
        ({"label_shift": -1}, ValueError, "attach(label_shift=...) must be an int >= 0"),
    ],
)
def test_a_bad_attach_option_is_refused_naming_it(kwargs, error, text):
    with pytest.raises(error) as info:
        Options(**kwargs)
    assert text in str(info.value)


def test_good_attach_options_are_kept():
    optimizer = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    options = Options(optimizer=optimizer, strict=True, output="logits", probe_batch_size=None, mask=None)
    assert options.optimizer is optimizer and options.output == "logits" and options.probe_batch_size is None
    assert Options(norm_stats="batch", label_shift=1).label_shift == 1


def test_names_are_looked_up_in_the_catalog_given_not_a_global_registry():
    """The engine imports no registry: ``parse_probes`` looks names up in the catalog it is handed."""

    class OneProbe:
        def __init__(self) -> None:
            self.asked: list[str] = []

        def available(self):
            return [plugins.ProbeInfo("own", "a probe of this catalog only", "test", Own)]

        def probe_class(self, name: str) -> type:
            self.asked.append(name)
            if name != "own":
                raise UnknownProbeError(f"no probe {name!r} in this catalog")
            return Own

        def sink_class(self, name: str) -> type:
            raise KeyError(name)

        def activation_types(self):
            return (), frozenset()

    catalog = OneProbe()
    ((name, probe),) = parse_probes({"own": {"scale": 2.0}}, catalog)
    assert name == "own" and isinstance(probe, Own) and probe.scale == 2.0 and catalog.asked == ["own"]
    with pytest.raises(UnknownProbeError, match="relu_zeros"):
        parse_probes(["relu_zeros"], catalog)  # a built-in name, but not in this catalog
    assert [n for n, _ in parse_probes("auto", catalog)] == ["own"]
