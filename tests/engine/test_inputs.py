"""Unit tests of ``probes.inputs`` (probe data forms, calling the model, picking its output) and of the probe
batch as the model needs it now (``ProbeData`` in ``probes.engine.probe_pass``: following the model's dtype and
device, the attention mask of dict inputs)."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

from probes.engine.probe_pass import ProbeData
from probes.inputs import (
    Positional,
    call_model,
    check_output_option,
    iter_tensors,
    map_tensors,
    sample_count,
    select_output,
    split_probe_data,
    take,
)

Pair = namedtuple("Pair", ["a", "b"])


class Output:
    """An object with attributes, as a Hugging Face ``ModelOutput`` is."""

    def __init__(self, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        self.logits, self.hidden = logits, hidden


class Recorder(nn.Module):
    """Returns how it was called: the positional and keyword arguments."""

    def forward(self, *args, **kwargs):
        return args, kwargs


class Token(nn.Module):
    """Token ids and a mask in, logits out (an embedding keeps integer inputs integer)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids))


# -- walking the probe inputs --------------------------------------------------------------------------------------


def test_map_tensors_keeps_the_structure_of_tuples_lists_namedtuples_and_dicts():
    x = {"a": (torch.ones(2), [torch.zeros(2), 3]), "b": Pair(torch.ones(1), "s")}
    out = map_tensors(x, lambda t: t + 1)
    assert type(out["a"]) is tuple and type(out["a"][1]) is list and type(out["b"]) is Pair
    assert out["a"][0].tolist() == [2.0, 2.0] and out["a"][1][0].tolist() == [1.0, 1.0]
    assert out["a"][1][1] == 3 and out["b"].b == "s"


def test_iter_tensors_names_where_each_tensor_is():
    x = {"input_ids": torch.zeros(2, 3), "extra": (torch.ones(2), "not a tensor")}
    assert [where for where, _ in iter_tensors(x)] == ["x['input_ids']", "x['extra'][0]"]


def test_sample_count_is_the_shared_leading_dimension():
    assert sample_count(torch.zeros(5, 3)) == 5
    assert sample_count((torch.zeros(4, 2), {"m": torch.ones(4)})) == 4


def test_sample_count_names_the_tensor_that_disagrees():
    with pytest.raises(ValueError) as info:
        sample_count({"a": torch.zeros(4, 2), "b": torch.zeros(3, 2)})
    assert str(info.value) == (
        "probe_data: x['b'] has shape (3, 2) but x['a'] has 4 samples; "
        "every tensor of the probe batch needs the samples along its first axis"
    )
    with pytest.raises(ValueError, match=r"^probe_data: x is a 0-d tensor"):
        sample_count(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"^probe_data: x holds no tensor \(got list\)"):
        sample_count([1, 2])


def test_take_selects_rows_of_every_tensor():
    x = {"a": torch.arange(6).reshape(3, 2), "b": torch.arange(3)}
    part = take(x, slice(1, 3))
    assert part["a"].tolist() == [[2, 3], [4, 5]] and part["b"].tolist() == [1, 2]
    assert take(torch.arange(5), torch.tensor([4, 0])).tolist() == [4, 0]


# -- the forms of probe_data ---------------------------------------------------------------------------------------


def test_a_tensor_is_one_argument_a_tuple_positional_arguments_a_dict_keywords():
    model, a, b = Recorder(), torch.zeros(2), torch.ones(2)
    args, kwargs = call_model(model, a)
    assert len(args) == 1 and args[0] is a and kwargs == {}
    args, kwargs = call_model(model, (a, b))
    assert len(args) == 2 and args[1] is b and kwargs == {}
    args, kwargs = call_model(model, {"input_ids": a, "attention_mask": b})
    assert args == () and list(kwargs) == ["input_ids", "attention_mask"] and kwargs["attention_mask"] is b


def test_split_probe_data_forms():
    x, y = torch.zeros(3, 2), torch.arange(3)
    assert split_probe_data((x, y)) == (x, y)
    assert split_probe_data([x, y]) == (x, y)
    assert split_probe_data((x,)) == (x, None)
    assert split_probe_data(x) == (x, None)
    assert split_probe_data(None) == (None, None)
    (a, b), labels = split_probe_data(((x, x), y))  # several inputs in a tuple as x
    assert a is x and b is x and labels is y


def test_split_probe_data_refuses_three_items():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"^probe_data must be x or \(x, y\), got a sequence of 3 items"):
        split_probe_data((x, x, x))


def test_a_dict_batch_with_label_key_gives_the_labels_and_the_inputs_without_them():
    ids, mask, labels = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.tensor([0, 1])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    x, y = split_probe_data(batch, label_key="labels")
    assert list(x) == ["input_ids", "attention_mask"] and x["input_ids"] is ids
    assert y is labels
    assert list(batch) == ["input_ids", "attention_mask", "labels"]  # the user's batch is left as it was


def test_label_key_needs_a_dict_batch_that_has_it():
    with pytest.raises(
        TypeError, match=r"^attach\(label_key='labels'\) needs probe_data to be a dict batch, got tuple"
    ):
        split_probe_data((torch.zeros(2), torch.zeros(2)), label_key="labels")
    with pytest.raises(KeyError) as info:
        split_probe_data({"input_ids": torch.zeros(2)}, label_key="labels")
    assert "the probe batch has no such key; it has ['input_ids']" in str(info.value)


# -- selecting the output ------------------------------------------------------------------------------------------


def test_the_default_output_is_the_tensor_the_logits_or_the_first_tensor():
    t, h = torch.zeros(2, 3), torch.ones(2, 5)
    assert select_output(t) is t
    assert select_output({"loss": h, "logits": t}) is t
    assert select_output(Output(t, h)) is t
    assert select_output(("no", h, t)) is h
    assert select_output([t, h]) is t


def test_output_picks_a_key_an_attribute_or_calls_a_function():
    t, h = torch.zeros(2, 3), torch.ones(2, 5)
    assert select_output({"logits": t, "hidden": h}, "hidden") is h
    assert select_output(Output(t, h), "hidden") is h
    assert select_output((t, h), lambda out: out[1]) is h


def test_an_output_that_is_not_there_or_not_a_tensor_is_an_error_describing_what_the_model_returned():
    t = torch.zeros(2, 3)
    with pytest.raises(ValueError) as info:
        select_output({"logits": t}, "hidden")
    assert (
        str(info.value)
        == "attach(output='hidden'): the model returned a dict with keys ['logits'], which has no 'hidden'"
    )
    with pytest.raises(TypeError, match=r"^attach\(output='n'\) gave a int, not a tensor"):
        select_output({"n": 3}, "n")
    with pytest.raises(TypeError, match=r"^the model returned a tuple of \['str', 'int'\]; the probes need one tensor"):
        select_output(("a", 1))


def test_check_output_option_accepts_none_names_and_callables_only():
    for good in (None, "logits", len):
        check_output_option(good)
    with pytest.raises(TypeError, match=r"^attach\(output=\.\.\.\) must be a key/attribute name or a callable"):
        check_output_option(0)


def test_positional_wraps_a_dict_input_model_as_tensors_in_one_tensor_out():
    model = Token()
    x = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "attention_mask": torch.ones(2, 2, dtype=torch.long)}
    wrapped, args = Positional.wrap(model, x)
    assert isinstance(wrapped, Positional) and len(args) == 2 and args[0] is x["input_ids"]
    torch.testing.assert_close(wrapped(*args), model(**x))
    assert {name for name, _ in wrapped.named_parameters()} == {
        "model.embed.weight",
        "model.head.weight",
        "model.head.bias",
    }
    plain, plain_args = Positional.wrap(model.head, torch.zeros(2, 4))
    assert plain is model.head and len(plain_args) == 1  # nothing to do for a tensor in, a tensor out


# -- the probe batch follows the model -----------------------------------------------------------------------------


def test_probe_data_casts_floating_inputs_to_the_models_dtype_and_keeps_integer_ones():
    model = nn.Linear(2, 2)
    x, y = {"f": torch.zeros(3, 2), "i": torch.arange(3)}, torch.tensor([0, 1, 0])
    data = ProbeData.from_probe_data((x, y), None, model)
    current_x, current_y = data.current()
    assert current_x["f"].dtype == torch.float32 and current_x["i"].dtype == torch.int64
    model.double()
    current_x, current_y = data.current()
    assert current_x["f"].dtype == torch.float64 and current_x["i"].dtype == torch.int64
    assert current_y.dtype == torch.int64  # labels keep their dtype
    assert x["f"].dtype == torch.float32  # what the user gave is untouched


def test_probe_data_is_cached_until_the_model_moves():
    model = nn.Linear(2, 2)
    data = ProbeData.from_probe_data(torch.zeros(3, 2), None, model)
    first = data.current()[0]
    assert data.current()[0] is first
    model.to(torch.float16)
    moved = data.current()[0]
    assert moved is not first and moved.dtype == torch.float16


def test_probe_data_follows_the_models_device():
    model = nn.Linear(2, 2)
    data = ProbeData.from_probe_data((torch.zeros(3, 2), torch.zeros(3)), None, model)
    model.to("meta")  # a device change that a CPU-only machine can make
    x, y = data.current()
    assert x.device.type == "meta" and y.device.type == "meta"


def test_probe_data_with_label_key_splits_the_dict_batch():
    model = Token()
    batch = {"input_ids": torch.tensor([[1, 2]]), "labels": torch.tensor([[2, -100]])}
    data = ProbeData.from_probe_data(batch, "labels", model)
    x, y = data.current()
    assert list(x) == ["input_ids"] and y.tolist() == [[2, -100]]


def test_the_attention_mask_of_dict_inputs_is_a_bool_mask():
    model = Token()
    x = {"input_ids": torch.tensor([[1, 2, 0], [3, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    data = ProbeData.from_probe_data(x, None, model)
    mask = data.mask("attention_mask")
    assert mask.dtype == torch.bool and mask.tolist() == [[True, True, False], [True, False, False]]
    assert data.mask(None) is None and data.mask("padding_mask") is None
    tensor_data = ProbeData.from_probe_data(torch.tensor([[1, 2]]), None, model)
    assert tensor_data.mask("attention_mask") is None  # only dict inputs carry a mask


def test_a_mask_that_is_not_batch_by_positions_is_no_mask():
    x = {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.ones(1, 1, 2)}
    assert ProbeData.from_probe_data(x, None, Token()).mask("attention_mask") is None


@pytest.mark.parametrize(
    ("probe_data", "error", "text"),
    [
        ((torch.zeros(3, 2), torch.zeros(2)), ValueError, "probe_data: x has 3 samples but y has shape (2,)"),
        (torch.zeros(0, 2), ValueError, "probe_data: the probe batch is empty (0 samples)"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "probe_data: x has 1 NaN or infinite values"),
        (torch.zeros(2, 2, dtype=torch.complex64), TypeError, "probe_data: the inputs (x) are complex"),
        (([1.0, 2.0], torch.zeros(2)), TypeError, "probe_data: the inputs (x) hold no tensor (got list)"),
    ],
    ids=["labels", "empty", "nan", "complex", "no-tensor"],
)
def test_a_bad_probe_batch_is_refused_naming_what_is_wrong(probe_data, error, text):
    with pytest.raises(error) as info:
        ProbeData.from_probe_data(probe_data, None, nn.Linear(2, 2))
    assert str(info.value).startswith(text)


def test_labels_given_as_a_list_become_a_tensor():
    data = ProbeData.from_probe_data((torch.zeros(2, 2), [0, 1]), None, nn.Linear(2, 2))
    _, y = data.current()
    assert isinstance(y, torch.Tensor) and y.tolist() == [0, 1]
