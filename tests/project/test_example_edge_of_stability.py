"""``examples/edge_of_stability.py --smoke``: the PNG and the event files are written, the logged edge ratio is
``lambda_max / (2 / lr)``, and the logged sharpness is the top eigenvalue of the dense Hessian
(``torch.func.hessian`` in float64) at the initial and at the trained parameters of the smoke's tiny net."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def example():
    from conftest import load_script

    path = Path(__file__).resolve().parents[2] / "examples" / "edge_of_stability.py"
    return load_script(path, "edge_of_stability_example")


@pytest.fixture(scope="module")
def smoke(example, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("eos")
    return example.main(["--smoke", "--logdir", str(logdir)]), logdir


def dense_sharpness(example, model: torch.nn.Module, P: int) -> float:
    """The largest eigenvalue of the dense float64 Hessian of the example's training loss."""
    model = copy.deepcopy(model).double()
    x, targets = example.make_data(P)
    x, targets = x.double(), targets.double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = theta[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return example.half_squared_error(torch.func.functional_call(model, params, (x,)), targets)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 682 x 682 Hessian: one thread is fastest, and shares the cores best
    try:
        hessian = torch.func.hessian(loss)(flat)
    finally:
        torch.set_num_threads(threads)
    assert hessian.shape == (flat.numel(), flat.numel())
    return float(torch.linalg.eigvalsh(hessian).max())


def test_smoke_writes_the_png_and_the_event_files(smoke):
    from PIL import Image

    result, logdir = smoke
    with Image.open(result["png"]) as png:
        assert png.size[0] > 800 and png.size[1] > 300
    for lr in result["args"].lrs:
        assert any(name.startswith("events") for name in os.listdir(logdir / f"lr{lr:g}"))


def test_edge_ratio_is_sharpness_over_two_over_lr(smoke):
    result, _ = smoke
    for lr, s in result["scalars"].items():
        sharpness = dict(s["hessian/eig_top/1"])
        ratio = dict(s["hessian/edge_ratio"])
        assert sorted(ratio) == sorted(sharpness) and len(ratio) >= 4
        for step, value in ratio.items():
            assert math.isclose(value, sharpness[step] / (2 / lr), rel_tol=1e-6)
        for _, threshold in s["hessian/stability_threshold"]:
            assert math.isclose(threshold, 2 / lr, rel_tol=1e-9)


def test_sharpness_is_the_dense_hessians_top_eigenvalue(example, smoke):
    result, _ = smoke
    args = result["args"]
    initial = dense_sharpness(example, example.make_model(args.width, args.seed), args.P)
    for lr, s in result["scalars"].items():
        (first_step, first), (last_step, last) = s["hessian/eig_top/1"][0], s["hessian/eig_top/1"][-1]
        assert (first_step, last_step) == (0, args.steps)
        assert math.isclose(first, initial, rel_tol=1e-6)  # float32 products: about 1e-8 here
        trained = dense_sharpness(example, result["models"][lr], args.P)
        assert not math.isclose(trained, initial, rel_tol=1e-3)  # training moved the sharpness
        assert math.isclose(last, trained, rel_tol=1e-6)


def test_the_summary_reads_the_logged_series(smoke):
    result, _ = smoke
    for lr, m in result["summary"].items():
        s = result["scalars"][lr]
        assert m["edge_ratio_max"] == max(v for _, v in s["hessian/edge_ratio"])
        crossed = [step for step, v in s["hessian/eig_top/1"] if v >= 2 / lr]
        assert m["first_crossing_step"] == (crossed[0] if crossed else None)
        assert m["loss_last"] < m["loss_first"]
