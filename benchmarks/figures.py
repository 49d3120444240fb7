"""What the probes' pictures cost (issue 21), as ratios against anchors measured in the same run.

1. Per figure kind: the median time to draw one image and encode it as the PNG the TensorBoard sink writes
   (what the sink's drawing thread spends per image), and what the measurement itself spends to hand the
   image over (a data record with host copies of the arrays). Target: <= 50 ms per image.
2. ``probes demo`` training time (attach to the end of ``close``, which waits for every image) with images
   against the same demo with images off, interleaved rounds. Target: within 1.3x.
3. A ResNet-18 (CIFAR, plain torch) ``patterns`` measurement at P = 64 (17 sites) with images against one
   without: the time the training thread waits, and the time until every image is written. Target: 1.5x.
4. The issue's acceptance case: an MLP on the digits with ntk, pathgram and patterns every 20 steps and an
   image every 200 steps, images on against off, interleaved rounds: training time ratio (target 1.3x), the
   same scalars, and every image written by the time ``close()`` returns.

    python benchmarks/figures.py [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _resnet import ResNet18  # noqa: E402
from _timing import paired_ratios, samples, table  # noqa: E402

import probes  # noqa: E402
from probes.app import (
    demo,  # noqa: E402
    render,  # noqa: E402
)
from probes.app.render import canvas  # noqa: E402

#: the issue's budgets
PER_IMAGE_MS = 50.0
DEMO_RATIO = 1.3
RESNET_RATIO = 1.5
ACCEPTANCE_RATIO = 1.3


def figure_kinds(P: int = 300) -> dict[str, callable]:
    """One drawing of each kind, sized as the demo (and a ResNet conv site) makes them; the data change a
    little at each call, as from one measurement to the next."""
    from probes.builtin.ntk import spectrum_drawing
    from probes.builtin.patterns import MAX_IMAGE_ROWS, gate_drawing

    rng = np.random.default_rng(0)
    lam = torch.tensor(np.sort(rng.lognormal(0, 3, P))[::-1].copy())
    order = torch.arange(P)
    starts = list(range(P // 10, P, P // 10))
    names = [str(k) for k in range(10)]
    gates = torch.from_numpy(rng.random((P, 64)) > 0.5)
    conv = torch.from_numpy(rng.random((64, 64 * 32 * 32)) > 0.5)  # a ResNet-18 first-stage site, P = 64
    a = rng.normal(size=(128, 20))
    gram = a @ a.T
    gram /= np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    cur = rng.normal(size=(32, 2))
    trails = np.cumsum(rng.normal(size=(200, 32, 2)) * 0.02, axis=0)
    teacher = rng.normal(size=(3, 2))

    def drift(a: np.ndarray | torch.Tensor, scale: float = 0.1) -> np.ndarray | torch.Tensor:
        factor = np.exp(rng.normal(0, scale, a.shape))
        return a * torch.from_numpy(factor) if isinstance(a, torch.Tensor) else a * factor

    def flip(g: torch.Tensor) -> torch.Tensor:
        return g ^ torch.from_numpy(rng.random(tuple(g.shape)) < 0.05)

    return {
        "ntk/spectrum": lambda: spectrum_drawing(drift(lam, 0.01), lam / 3, step=200, reference_step=0),
        "pathgram/gram": lambda: probes.records.Matrix(
            np.clip(drift(gram, 0.01), -1, 1),
            tuple(starts[:9]),
            tuple(names),
            title="pathgram/gram: cosine of path kernel H, step 200",
            colorbar_label="cosine H_ij / sqrt(H_ii H_jj)",
            vmax=1.0,
            xlabel="probe sample j (128 of 300 samples)",
            ylabel="probe sample i (same order)",
        ),
        "patterns (MLP site)": lambda: gate_drawing(flip(gates), order, starts, names, "patterns/1: gates, step 200"),
        f"patterns (conv site, {MAX_IMAGE_ROWS} rows)": lambda: gate_drawing(
            conv, torch.arange(64), [32], ["0", "1"], "patterns/layers.0.relu#1: gates, step 200", 4
        ),
        "particles/positions": lambda: probes.records.Trails(
            drift(cur, 0.02),
            trails,
            cur[:, 0] > 0,
            teacher,
            None,
            3.0,
            title="particles/positions: a_j w_j of 32 hidden units, step 200",
        ),
    }


def per_kind(rounds: int) -> dict[str, float]:
    """Median ms per image of each kind, draw + PNG (what the sink's drawing process spends), in three cases:
    the figure's layout is kept (its limits and labels as at the last image: most images of a run), the layout
    changed (the still parts are drawn again), and a new figure (the first image of a tag); and the hand-over
    (what the measurement spends)."""
    kinds = figure_kinds()
    cpu: dict[str, list[float]] = {name: [] for name in kinds}

    def drawn(name: str, case: str) -> callable:
        def fn() -> None:
            if case == "new figure":
                canvas._KEPT.clear()
            elif case == "layout changed":
                for entry in canvas._KEPT.values():
                    entry.pop("signature", None)
            t0 = time.thread_time()
            render.encode_png(render.draw(kinds[name]()))
            if case == "layout kept":
                cpu[name].append(time.thread_time() - t0)

        return fn

    cases = ("layout kept", "layout changed", "new figure")
    cost = {
        c: {k: statistics.median(v) for k, v in samples({k: drawn(k, c) for k in kinds}, rounds=rounds).items()}
        for c in cases
    }
    handed = {k: statistics.median(v) for k, v in samples(dict(kinds), rounds=rounds, warmup=1).items()}
    width = max(len(k) for k in kinds)
    print(
        f"\n1. cost per image, ms, median of {rounds} (budget {PER_IMAGE_MS:.0f} ms for the images of a run: the "
        "layout is kept but where the limits move; CPU: the drawing thread's own time, which other processes on "
        "the cores do not inflate)"
    )
    print(
        f"{'figure':<{width}}  " + "  ".join(f"{c:>14}" for c in cases) + f"  {'kept, CPU':>9}  {'hand-over':>9}"
        "  within budget"
    )
    for k in kinds:
        print(
            f"{k:<{width}}  "
            + "  ".join(f"{cost[c][k] * 1e3:>14.1f}" for c in cases)
            + f"  {statistics.median(cpu[k]) * 1e3:>9.1f}  {handed[k] * 1e3:>9.2f}  "
            f"{'yes' if cost['layout kept'][k] * 1e3 <= PER_IMAGE_MS else 'NO'}"
        )
    return cost["layout kept"]


def demo_ratio(rounds: int, epochs: int | None, smoke: bool) -> float:
    """``probes demo`` (no progress bar) with images against images off: training time, paired per round."""
    tmp = Path(tempfile.mkdtemp(prefix="probes-figures-demo-"))
    times: dict[str, list[float]] = {"images off": [], "images on": []}
    for _ in range(rounds):
        for case, images in (("images off", False), ("images on", True)):
            result: dict[str, float] = {}
            demo.run_demo(
                str(tmp / case.replace(" ", "-")),
                epochs=epochs,
                smoke=smoke,
                progress=False,
                out=io.StringIO(),
                images=images,
                result=result,
            )
            times[case].append(result["train_s"])
    ratios = paired_ratios(times, "images off")
    med = {k: statistics.median(v) for k, v in times.items()}
    what = f"{epochs or demo.DEFAULT_EPOCHS} epochs{', smoke' if smoke else ''}, {rounds} rounds"
    print(
        table(
            med, "images off", f"\n2. probes demo training time ({what}; budget {DEMO_RATIO}x)", unit="s", ratios=ratios
        )
    )
    return ratios["images on"]


def resnet_patterns(rounds: int, width: int, P: int) -> tuple[float, float]:
    """One ``patterns`` measurement on a ResNet-18 (17 sites) with images against without: the wait of the
    training thread (``session.measure()``) and the time until every image is written (``+ flush()``)."""
    torch.manual_seed(0)
    model = ResNet18(width)
    x, y = torch.randn(P, 3, 32, 32), torch.randint(0, 10, (P,))
    tmp = Path(tempfile.mkdtemp(prefix="probes-figures-resnet-"))
    sessions = {}
    for case, image in (("no images", False), ("images", True)):
        sessions[case] = probes.attach(
            model,
            {"patterns": {"every": 10**9, "image": image}},
            probe_data=(x, y),
            logdir=str(tmp / case.replace(" ", "-")),
            sinks=["memory"],
            overhead=None,
        )
    n_images = len(sessions["images"].memory.images())  # image tags: one per site

    def measure(case: str, drain: bool) -> None:
        s = sessions[case]
        s.step()  # a new step: one measurement per step
        s.measure()
        if drain:
            s.flush()

    cases = {
        "no images": lambda: measure("no images", True),
        "images (training thread)": lambda: measure("images", False),
        "images (all written)": lambda: measure("images", True),
    }
    got = samples(cases, rounds=rounds, warmup=1)
    for s in sessions.values():
        s.close()
    ratios = paired_ratios(got, "no images")
    med = {k: statistics.median(v) for k, v in got.items()}
    print(
        table(
            med,
            "no images",
            f"\n3. ResNet-18 (width {width}) patterns measurement at P = {P} ({n_images} images; "
            f"{rounds} rounds; budget {RESNET_RATIO}x)",
            unit="s",
            ratios=ratios,
        )
    )
    return ratios["images (training thread)"], ratios["images (all written)"]


def acceptance(rounds: int, steps: int, every: int, image_every: int) -> float:
    """The MLP run of the issue's acceptance: ntk, pathgram, patterns every ``every`` steps, an image every
    ``image_every`` steps, images on against off; same scalars; every image written when close returns."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    xtr, ytr, _, _, xp, yp = demo._split()
    tmp = Path(tempfile.mkdtemp(prefix="probes-figures-accept-"))
    scalars: dict[str, dict] = {}
    written: dict[str, int] = {}
    expected_images = 0

    def run(case: str, images: bool, k: int) -> None:
        nonlocal expected_images
        torch.manual_seed(0)
        model = demo.build_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        off = {"ntk": {"image": False}, "pathgram": {"image": None}, "patterns": {"image": False}}
        spec = {
            name: {"every": every, **({"image_every": image_every} if images else off[name])}
            for name in ("ntk", "pathgram", "patterns")
        }
        logdir = tmp / f"{case.replace(' ', '-')}-{k}"
        g = torch.Generator().manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = probes.attach(
                model, spec, probe_data=(xp, yp), logdir=str(logdir), sinks=["memory"], optimizer=opt, overhead=None
            )
        for _ in range(steps):
            idx = torch.randint(0, xtr.shape[0], (50,), generator=g)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        session.close()
        if k == 0:
            scalars[case] = session.memory.scalars()
            n_memory = sum(len(v) for v in session.memory.images().values())
            acc = EventAccumulator(str(logdir), size_guidance={"images": 0}).Reload()  # read after close returned
            written[case] = sum(len(acc.Images(t)) for t in acc.Tags()["images"])
            if images:
                expected_images = n_memory

    cases = {"images off": None, "images on": None}
    counter = {"images off": 0, "images on": 0}

    def case_fn(case: str) -> callable:
        def fn() -> None:
            run(case, case == "images on", counter[case])
            counter[case] += 1

        return fn

    got = samples({c: case_fn(c) for c in cases}, rounds=rounds, warmup=0)
    ratios = paired_ratios(got, "images off")
    med = {k: statistics.median(v) for k, v in got.items()}
    print(
        table(
            med,
            "images off",
            f"\n4. acceptance: MLP, ntk + pathgram + patterns every {every} steps, an image "
            f"every {image_every}, {steps} steps, {rounds} interleaved rounds (budget {ACCEPTANCE_RATIO}x)",
            unit="s",
            ratios=ratios,
        )
    )
    same = scalars["images off"] == scalars["images on"]
    print(
        f"same scalars with and without images: {same} ({sum(len(v) for v in scalars['images on'].values())} "
        f"points); images written by close: {written['images on']} of {expected_images} "
        f"({'all' if written['images on'] == expected_images else 'MISSING'})"
    )
    if not same or written["images on"] != expected_images or written["images off"] != 0:
        raise SystemExit("acceptance: scalars differ or images are missing")
    return ratios["images on"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, shorter runs")
    ap.add_argument("--smoke", action="store_true", help="seconds: checks that every section runs")
    ap.add_argument("--only", choices=["figures", "demo", "resnet", "acceptance"], help="one section")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the demo: small matrices, cores shared with the drawing thread
    if args.smoke:
        per_kind(rounds=2)
        demo_ratio(rounds=1, epochs=1, smoke=True)
        resnet_patterns(rounds=1, width=8, P=8)
        acceptance(rounds=1, steps=40, every=5, image_every=20)
        return
    quick = args.quick
    if args.only:
        {
            "figures": lambda: per_kind(rounds=5 if quick else 15),
            "demo": lambda: demo_ratio(rounds=2 if quick else 3, epochs=10 if quick else None, smoke=False),
            "resnet": lambda: resnet_patterns(rounds=2 if quick else 5, width=64, P=64),
            "acceptance": lambda: acceptance(
                rounds=2 if quick else 4, steps=400 if quick else 1000, every=20, image_every=200
            ),
        }[args.only]()
        return
    drawn = per_kind(rounds=5 if quick else 15)
    r_demo = demo_ratio(rounds=2 if quick else 3, epochs=10 if quick else None, smoke=False)
    r_thread, r_all = resnet_patterns(rounds=2 if quick else 5, width=64, P=64)
    r_acc = acceptance(rounds=2 if quick else 4, steps=400 if quick else 1000, every=20, image_every=200)
    print("\nsummary against the issue's budgets")
    print(f"  slowest figure: {max(drawn.values()) * 1e3:.1f} ms per image (budget {PER_IMAGE_MS:.0f})")
    print(f"  demo with images / without: {r_demo:.2f}x (budget {DEMO_RATIO}x)")
    print(
        f"  ResNet-18 patterns with images / without: {r_thread:.2f}x waited by training, {r_all:.2f}x until "
        f"every image is written (budget {RESNET_RATIO}x)"
    )
    print(f"  acceptance MLP with images / without: {r_acc:.2f}x (budget {ACCEPTANCE_RATIO}x)")


if __name__ == "__main__":
    main()
