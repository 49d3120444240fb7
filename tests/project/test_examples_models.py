"""The model examples in smoke mode: a GPT-2 causal LM under the ``Trainer`` and a small ViT on the digits.

Each writes its TensorBoard run and PNG into ``tmp_path``; the tests read the event files back with TensorBoard's
own reader (not the probes' memory sink) and check that no probe failed, that the token labels gave alignment and
margin on the language model, and that the passive counts saw the Trainer's forwards.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[2]


def event_tags(logdir: Path) -> set[str]:
    """Every scalar tag in the event files directly under ``logdir``, read by TensorBoard's event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def finite_in(points: list[tuple[int, float]], lo: float, hi: float) -> bool:
    return bool(points) and all(math.isfinite(v) and lo <= v <= hi for _, v in points)


def test_gpt2_trainer_smoke(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    example = load_script(ROOT / "examples" / "gpt2_trainer.py", "_example_gpt2_trainer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = example.main(["--smoke", "--logdir", str(tmp_path)])
    assert result["failures"] == {}
    assert Path(result["png"]).is_file() and Path(result["png"]).stat().st_size > 10_000
    assert result["probes"] == ["alignment", "grad_noise", "hessian", "margin", "ntk", "patterns", "relu_zeros"]
    assert result["callbacks"] == 1  # one ProbesCallback("auto"): no duplicate callback for the Trainer to warn of
    s = result["scalars"]
    # token labels worked: one alignment per block's MLP activation and the logits, and the margin, from step 0
    blocks = [f"alignment/transformer.h.{i}.mlp.act/cka" for i in range(2)]
    for tag in [*blocks, "alignment/output/cka"]:
        assert finite_in(s[tag], 0.0, 1.0), tag
        # "auto": 4 steps, the defaults scaled to every step (the overhead budget may space them out when loaded)
        steps = [t for t, _ in s[tag]]
        assert steps[0] == 0 and steps[-1] == 4 and len(steps) >= 3, tag
    assert finite_in(s["margin/n_delta_fraction"], 0.0, 1.0)
    # relu_zeros counted on the Trainer's own forwards (causal LM, labels = input_ids): not all zero, not all on
    for i in range(2):
        assert finite_in(s[f"relu_zeros/transformer.h.{i}.mlp.act/fraction"], 0.01, 0.99)
        assert all(v > 0 for _, v in s[f"relu_zeros/transformer.h.{i}.mlp.act/zeros"])
    # the NTK of the last position's logits: a positive kernel that starts at its own initial value
    assert finite_in(s["ntk/trace"], 1e-12, math.inf)
    assert s["ntk/distance_from_init"][0] == (0, pytest.approx(0.0, abs=1e-9))
    assert finite_in(s["ntk/distance_from_init"], 0.0, 2.0)
    # the Trainer's loss (next token, vocab 32 at first) and the probe tags share one TensorBoard run
    assert finite_in(result["loss"], 0.0, math.log(32) + 1.0)
    tags = event_tags(tmp_path)
    assert {"train/loss", "alignment/output/cka", "margin/n_delta_fraction", "ntk/trace"} <= tags
    assert set(blocks) <= tags


def test_vit_smoke(tmp_path: Path) -> None:
    example = load_script(ROOT / "examples" / "vit.py", "_example_vit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = example.main(["--smoke", "--logdir", str(tmp_path)])
    assert result["failures"] == {}
    assert Path(result["png"]).is_file() and Path(result["png"]).stat().st_size > 10_000
    for split in ("train", "test"):
        assert finite_in(result["accuracy"][split], 0.0, 1.0)
    s = result["scalars"]
    blocks = [f"alignment/blocks.{i}.mlp.1/cka" for i in range(2)]  # smoke: depth 2
    assert {t for t in s if t.startswith("alignment/")} == {*blocks, "alignment/output/cka"}
    for tag in [*blocks, "alignment/output/cka"]:
        assert finite_in(s[tag], 0.0, 1.0), tag
    assert finite_in(s["margin/n_delta_fraction"], 0.0, 1.0)
    assert finite_in(s["relu_zeros/blocks.0.mlp.1/fraction"], 0.01, 0.99)
    assert finite_in(s["ntk/trace"], 1e-12, math.inf)
    assert s["ntk/distance_from_init"][0] == (0, pytest.approx(0.0, abs=1e-9))
    assert {"accuracy/test", "train/loss", "ntk/distance_from_init", *blocks} <= event_tags(tmp_path)


def test_the_gpt2_trainer_page_says_what_ntk_does_with_token_labels() -> None:
    # ntk keeps token labels (the kernel of the last position's logits) and leaves out only ntk/alignment
    doc = (ROOT / "docs" / "examples.md").read_text(encoding="utf-8")
    gpt2 = doc[doc.index("**A GPT-2 under the Trainer.**") : doc.index("**A small ViT on the digits.**")]
    assert "refuses token labels" not in gpt2 and "a second callback" not in gpt2
    assert "`ntk/alignment`" in gpt2 and 'ProbesCallback("auto"' in gpt2
