"""Bad probe data, and a model without values, are errors at attach that name ``probe_data`` (or the model), the part
(inputs or labels) and what is wrong, never a bare torch error; attach leaves nothing behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import probes

X, Y = torch.randn(10, 4), torch.randint(0, 2, (10,))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


BAD = {
    "labels as strings": ((X, ["cat"] * 10), TypeError, ["probe_data", "labels (y)", "list"]),
    "labels as objects": ((X, np.array([object()] * 10)), TypeError, ["probe_data", "labels (y)", "ndarray"]),
    "labels with None": ((X, [None] * 10), TypeError, ["probe_data", "labels (y)"]),
    "labels on meta": ((X, Y.to("meta")), ValueError, ["probe_data", "labels (y)", "meta device"]),
    "complex labels": ((X, torch.randn(10, dtype=torch.cfloat)), TypeError, ["probe_data", "labels (y)", "complex"]),
    "inputs on meta": ((X.to("meta"), Y), ValueError, ["probe_data", "inputs (x)", "meta device"]),
    "a dict input on meta": (({"a": X.to("meta")}, Y), ValueError, ["probe_data", "inputs (x['a'])", "meta"]),
    "sparse inputs": ((X.to_sparse(), Y), ValueError, ["probe_data", "inputs (x)", "sparse", "dense"]),
    "numpy inputs": ((X.numpy(), Y), TypeError, ["probe_data", "inputs (x)", "ndarray", "torch.as_tensor"]),
    "strings as inputs": (("some text", Y), TypeError, ["probe_data", "inputs (x)", "str"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_probe_data_is_named_at_attach(case):
    probe_data, error, words = BAD[case]
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as info:
        probes.attach(model, ["alignment", "relu_zeros"], probe_data=probe_data)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("spec", [["alignment"], ["relu_zeros"]])
def test_a_model_on_the_meta_device_is_named_at_attach(spec):
    model = net().to("meta")
    with pytest.raises(ValueError, match=r"meta device \(parameter '0.weight'.*to_empty"):
        probes.attach(model, spec, probe_data=(X, Y))


def test_labels_given_as_numbers_still_convert():
    """Lists and arrays of numbers are labels as before."""
    model = net()
    for y in (Y.tolist(), Y.numpy(), Y.bool()):
        with probes.attach(model, ["alignment"], probe_data=(X, y)) as session:
            session.step()
        assert "alignment/output/cka" in session.memory.scalars()
