"""Unit tests of ``probes.options``: each checker returns what it accepts normalised, and refuses the rest with a
``TypeError`` (wrong type) or ``ValueError`` (out of range) whose message names the probe and the option."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
import torch
from torch import nn

from probes import options


def refused(error: type[Exception], check, *args, **kwargs) -> str:
    """The message of ``check(probe "p", option "opt", ...)``, which must raise ``error`` naming both."""
    with pytest.raises(error) as info:
        check("p", "opt", *args, **kwargs)
    assert type(info.value) is error
    message = str(info.value)
    assert message.startswith("p: option 'opt' must ")
    return message


# -- integer -------------------------------------------------------------------------------------------------------


def test_integer_accepts_python_and_numpy_ints_as_python_ints():
    assert options.integer("p", "opt", 3) == 3
    value = options.integer("p", "opt", np.int32(4), minimum=1)
    assert value == 4 and type(value) is int
    assert options.integer("p", "opt", None, optional=True) is None
    assert options.integer("p", "opt", 10, minimum=1, maximum=10) == 10


@pytest.mark.parametrize("value", [2.0, True, np.bool_(True), "3", None])
def test_integer_refuses_what_is_not_an_int(value):
    message = refused(TypeError, options.integer, value)
    assert message.endswith(f"got {value!r}")


def test_integer_refuses_an_int_out_of_range_saying_the_range():
    assert refused(ValueError, options.integer, 0, minimum=1) == "p: option 'opt' must be a positive int, got 0"
    assert refused(ValueError, options.integer, -1, minimum=0) == "p: option 'opt' must be a non-negative int, got -1"
    assert refused(ValueError, options.integer, 2, minimum=3) == "p: option 'opt' must be an int >= 3, got 2"
    message = refused(ValueError, options.integer, 11, minimum=1, maximum=10)
    assert message == "p: option 'opt' must be a positive int <= 10, got 11"
    message = refused(ValueError, options.integer, 1, minimum=2, maximum=5, optional=True)
    assert message == "p: option 'opt' must be None or an int from 2 to 5, got 1"
    assert "must be an odd int" in refused(ValueError, options.integer, 0, minimum=1, what="an odd int")


# -- number --------------------------------------------------------------------------------------------------------


def test_number_accepts_finite_reals_as_floats():
    value = options.number("p", "opt", 2)
    assert value == 2.0 and type(value) is float
    assert options.number("p", "opt", np.float32(0.5), positive=True, below=1) == 0.5
    assert options.number("p", "opt", 0.0, minimum=0.0) == 0.0
    assert options.number("p", "opt", None, optional=True) is None


@pytest.mark.parametrize("value", ["1", True, None, 1j, torch.tensor(1.0)])
def test_number_refuses_what_is_not_a_real_number(value):
    refused(TypeError, options.number, value)


def test_number_refuses_nan_infinity_and_out_of_range_saying_the_range():
    assert refused(ValueError, options.number, math.nan).startswith("p: option 'opt' must be a finite number, got nan")
    assert "a positive finite number" in refused(ValueError, options.number, 0.0, positive=True)
    assert "a finite number >= 1" in refused(ValueError, options.number, 0.5, minimum=1)
    assert "a number in (0, 1)" in refused(ValueError, options.number, 1.0, positive=True, below=1)
    assert "a finite number < 2" in refused(ValueError, options.number, 2, below=2)
    assert "None or a finite number" in refused(ValueError, options.number, math.inf, optional=True)


# -- choice, flag --------------------------------------------------------------------------------------------------


def test_choice_accepts_one_of_the_allowed_values():
    assert options.choice("p", "opt", "all", ("relu", "all")) == "all"
    assert options.choice("p", "opt", None, (None, "x")) is None


def test_choice_refuses_others_listing_the_allowed_values():
    message = refused(ValueError, options.choice, "any", ("relu", "all"))
    assert message == "p: option 'opt' must be one of 'relu', 'all', got 'any'"
    refused(TypeError, options.choice, 3, ("relu", "all"))  # not even a string
    refused(ValueError, options.choice, None, ("relu", "all"))
    refused(TypeError, options.choice, True, (1, 2))  # True == 1, but a bool is not an int here


def test_flag_accepts_only_bools():
    assert options.flag("p", "opt", True) is True
    assert options.flag("p", "opt", np.bool_(False)) is False
    for value in (1, 0, "True", None):
        assert refused(TypeError, options.flag, value) == f"p: option 'opt' must be True or False, got {value!r}"


# -- names, text, path ---------------------------------------------------------------------------------------------


def test_names_accepts_none_one_name_or_a_sequence_as_a_list():
    assert options.names("p", "opt", None) is None
    assert options.names("p", "opt", "act#1") == ["act#1"]
    assert options.names("p", "opt", ("a", "layer.*")) == ["a", "layer.*"]


@pytest.mark.parametrize("value", ["", [], ["a", ""], ["a", 3], {"a"}, 3])
def test_names_refuses_anything_else(value):
    assert "must be site names or fnmatch patterns" in refused(TypeError, options.names, value)


def test_text_accepts_a_non_empty_string():
    assert options.text("p", "opt", "fc1") == "fc1"
    assert options.text("p", "opt", None, optional=True) is None
    assert refused(TypeError, options.text, "") == "p: option 'opt' must be a non-empty string, got ''"
    assert refused(TypeError, options.text, 3, optional=True, what="a module path").startswith(
        "p: option 'opt' must be None or a module path"
    )


def test_path_accepts_strings_and_path_likes_as_strings(tmp_path):
    assert options.path("p", "opt", "runs/a") == "runs/a"
    assert options.path("p", "opt", pathlib.Path(tmp_path) / "x") == str(tmp_path / "x")
    assert options.path("p", "opt", None, optional=True) is None
    assert refused(TypeError, options.path, None) == "p: option 'opt' must be a path, got None"
    refused(TypeError, options.path, "")


# -- sizes, array --------------------------------------------------------------------------------------------------


def test_sizes_accepts_one_number_or_a_sequence_of_positive_numbers():
    assert options.sizes("p", "opt", 0.5) == (0.5,)
    assert options.sizes("p", "opt", [1, 2.5]) == (1.0, 2.5)
    assert options.sizes("p", "opt", np.array([0.1, 0.2])) == (0.1, 0.2)
    assert options.sizes("p", "opt", torch.tensor([3.0])) == (3.0,)


def test_sizes_refuses_empty_non_positive_and_non_numbers():
    refused(ValueError, options.sizes, [])
    refused(ValueError, options.sizes, [1.0, 0.0])
    refused(ValueError, options.sizes, [math.inf])
    refused(TypeError, options.sizes, "1")
    refused(TypeError, options.sizes, [1.0, "2"])
    refused(TypeError, options.sizes, {1.0})


def test_array_returns_a_float64_cpu_copy():
    source = torch.tensor([[1.0, 2.0]], dtype=torch.float32)
    out = options.array("p", "opt", source, ndim=(2,))
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    source[0, 0] = 9.0
    assert out.tolist() == [[1.0, 2.0]]  # a copy, not a view
    assert options.array("p", "opt", np.arange(3)).tolist() == [0.0, 1.0, 2.0]
    assert options.array("p", "opt", [[1, 2], [3, 4]]).shape == (2, 2)
    assert options.array("p", "opt", 2.5).tolist() == 2.5


@pytest.mark.parametrize(
    "value",
    [torch.tensor([True]), torch.tensor([1j]), np.array(["a"]), ["a"], [True, False], torch.float32, nn.Linear(1, 1)],
    ids=["bool-tensor", "complex", "str-array", "str-list", "bool-list", "dtype", "module"],
)
def test_array_refuses_what_is_not_real_numbers(value):
    assert refused(TypeError, options.array, value).startswith("p: option 'opt' must be a tensor of finite real")


def test_array_refuses_a_wrong_shape_empty_ragged_or_non_finite_saying_why():
    assert refused(ValueError, options.array, [1.0, 2.0], ndim=(2,)).endswith("(shape (2,))")
    assert refused(ValueError, options.array, []).endswith("(empty)")
    assert refused(ValueError, options.array, [1.0, math.nan]).endswith("(NaN or infinite entries)")
    refused(ValueError, options.array, [[1.0], [1.0, 2.0]])


# -- dtypes, module types, ordered ---------------------------------------------------------------------------------


def test_floating_dtype_accepts_a_floating_dtype_its_name_or_a_keyword():
    assert options.floating_dtype("p", "opt", torch.float16) is torch.float16
    assert options.floating_dtype("p", "opt", "double") is torch.float64
    assert options.floating_dtype("p", "opt", "auto", keywords=("auto",)) == "auto"


def test_floating_dtype_refuses_other_dtypes_and_types():
    message = refused(ValueError, options.floating_dtype, torch.int64, keywords=("auto",))
    assert message == "p: option 'opt' must be 'auto' or a floating torch dtype (or its name), got torch.int64"
    assert options.floating_dtype("p", "opt", "float") is torch.float32  # torch.float
    refused(ValueError, options.floating_dtype, "int32")
    refused(ValueError, options.floating_dtype, "no_such_dtype")
    refused(TypeError, options.floating_dtype, 64)


def test_module_types_accepts_a_module_class_or_a_collection_of_them():
    assert options.module_types("p", "opt", nn.Conv2d) == (nn.Conv2d,)
    assert options.module_types("p", "opt", [nn.Conv2d, nn.MaxPool2d]) == (nn.Conv2d, nn.MaxPool2d)
    assert options.module_types("p", "opt", {nn.Linear}) == (nn.Linear,)


@pytest.mark.parametrize("value", [nn.Conv2d(1, 1, 1), "Conv2d", int, [nn.Linear, int], None])
def test_module_types_refuses_instances_names_and_other_classes(value):
    assert "must be an nn.Module subclass or a sequence of them" in refused(TypeError, options.module_types, value)


def test_ordered_refuses_a_low_bound_above_the_high_one():
    options.ordered("p", "low", 1.0, "high", 1.0)
    with pytest.raises(ValueError) as info:
        options.ordered("p", "low", 2.0, "high", 1.0)
    assert str(info.value) == "p: option 'low' must not exceed option 'high', got 2.0 > 1.0"


# -- what were known bugs: 0-d sizes, huge ints ------------------------------------------------------------------


@pytest.mark.parametrize("value", [torch.tensor(0.5), np.array(0.5)], ids=["tensor", "array"])
def test_sizes_of_a_0d_tensor_is_one_size_or_a_named_error(value):
    try:
        assert options.sizes("p", "opt", value) == (0.5,)
    except (TypeError, ValueError) as exc:
        assert str(exc).startswith("p: option 'opt' must ")


def test_number_of_a_huge_int_is_a_named_value_error():
    refused(ValueError, options.number, 10**400)
