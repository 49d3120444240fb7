"""``probes demo``: a ReLU MLP learns the embedded digits with every built-in probe attached.

The first thing to run: no data to download, no code to write. It trains a 64-64-32-10 ReLU MLP
on 1,500 of scikit-learn's handwritten digits (the rest is the test set) with SGD, attaches every
built-in probe with options that suit this model (a probe that cannot apply is left out with the
reason), shows a progress bar, and ends with a table of the last value of each key scalar and the
command that opens TensorBoard. Each run writes to a fresh subdirectory of ``logdir``, so several
runs sit side by side in TensorBoard. Default length: well under a minute on two CPU cores.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_EPOCHS = 30
SMOKE_EPOCHS = 2
BATCH = 50
PROBE_PER_CLASS = 30

#: options per built-in probe for this model (sites "1" and "3" are the two ReLUs); cadence in steps. Images
#: every 100 steps (and at step 0): 10 per tag in the default 30 epochs, enough to watch them change, all kept
#: by TensorBoard's default of 10 images per tag, and the event files stay small
OPTIONS: dict[str, dict[str, Any]] = {
    "relu_zeros": {"every": 10},
    "margin": {"every": 10},
    "patterns": {"every": 20, "image_every": 100},
    "pathgram": {"every": 20, "image_every": 100},
    "alignment": {"every": 20},
    "particles": {"every": 20, "layer": "2", "image_every": 100},
    "linear_region": {"every": 30},
    "ntk": {"every": 50, "image_every": 100},
}
#: options that turn each probe's images off (``run_demo(images=False)``, to measure what the images cost);
#: particles keeps its first image (its positions are the probe's point)
IMAGES_OFF: dict[str, dict[str, Any]] = {
    "patterns": {"image": False},
    "pathgram": {"image": None},
    "particles": {"image_every": 10**9},
    "ntk": {"image": False},
}
#: TensorBoard keeps 10 images per tag unless told otherwise; this keeps every one (the demo writes < 20)
SAMPLES_PER_PLUGIN = "images=100"

#: scalars shown in the final table, in this order, when they were written
KEY_SCALARS = [
    "train/loss",
    "train/accuracy",
    "test/accuracy",
    "relu_zeros/total/fraction",
    "relu_zeros/1/dead_in_window",
    "relu_zeros/3/dead_in_window",
    "patterns/1/dead_on_probe_batch",
    "patterns/3/dead_on_probe_batch",
    "patterns/distinct",
    "patterns/1/churn_from_init",
    "patterns/3/churn_from_init",
    "pathgram/norm_normalized",
    "pathgram/condition",
    "alignment/1/cka",
    "alignment/3/cka",
    "alignment/output/cka",
    "ntk/trace",
    "ntk/condition",
    "ntk/effective_rank",
    "ntk/alignment",
    "ntk/distance_from_init",
    "margin/n_delta_fraction",
    "margin/loss",
    "linear_region/flip_fraction",
    "linear_region/l_gen",
    "particles/mean_norm",
]


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _split(seed: int = 0) -> tuple[torch.Tensor, ...]:
    from probes.data import balanced_subset, load_digits

    x, y = load_digits()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    x, y = x[perm], y[perm]
    xtr, ytr, xte, yte = x[:1500], y[:1500], x[1500:], y[1500:]
    idx = balanced_subset(ytr, PROBE_PER_CLASS, generator=g)
    return xtr, ytr, xte, yte, xtr[idx], ytr[idx]


#: built-ins the demo leaves out: the curvature probes have their own example (examples/edge_of_stability.py), and the
#: demo keeps to the seeds' probes and its time
NOT_IN_DEMO = frozenset({"hessian", "grad_noise"})


def choose_probes(
    model: nn.Module,
    probe_data: tuple[torch.Tensor, torch.Tensor],
    smoke: bool,
    out: Any = sys.stdout,
    images: bool = True,
) -> dict[str, dict[str, Any]]:
    """Every built-in probe whose set-up accepts this model, with its demo options (``images=False``: with
    ``IMAGES_OFF`` too)."""
    import probes
    from probes.engine.needs import check_declared
    from probes.probe import ProbeBatch

    chosen: dict[str, dict[str, Any]] = {}
    for info in probes.available():
        if info.source != "builtin" or info.name in NOT_IN_DEMO:
            continue
        opts = dict(OPTIONS.get(info.name, {}))
        if not images:
            opts.update(IMAGES_OFF.get(info.name, {}))
        if smoke:
            opts["every"] = max(1, int(opts.get("every", getattr(info.cls, "every", 1))) // 5)
            if "image_every" in opts and images:
                opts["image_every"] = max(1, int(opts["image_every"]) // 5)
        trial = {k: v for k, v in opts.items() if k != "every"}
        try:
            probe = info.cls(**trial)
            check_declared(info.name, probe, probe_data[0], probe_data[1])
            probe.check(ProbeBatch(model, probe_data[0], probe_data[1], None, {}, 0))
        except Exception as exc:  # noqa: BLE001 - a probe that cannot apply is left out, with the reason
            print(f"  left out {info.name}: {exc}", file=out)
            continue
        chosen[info.name] = opts
    return chosen


class Progress:
    """One line redrawn with ``\\r``: epoch, a bar, loss, accuracy and the time left."""

    def __init__(self, total: int, enabled: bool, out: Any = sys.stdout, width: int = 24) -> None:
        self.total, self.enabled, self.out, self.width = total, enabled, out, width
        self.t0 = time.perf_counter()
        self._last = -1.0

    def update(self, done: int, text: str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < self.total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / max(self.total, 1)
        filled = int(round(frac * self.width))
        elapsed = now - self.t0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        self.out.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {text} "
            f"{elapsed:4.0f}s (~{eta:3.0f}s left) "
        )
        self.out.flush()

    def close(self) -> None:
        if self.enabled:
            self.out.write("\n")
            self.out.flush()


def _format(v: float) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if v == int(v) and abs(v) < 1e9:
        return f"{int(v)}"
    return f"{v:.4g}"


def run_demo(
    logdir: str = "runs/demo",
    epochs: int | None = None,
    smoke: bool = False,
    progress: bool = True,
    out: Any = None,
    images: bool = True,
    result: dict[str, float] | None = None,
) -> int:
    """Train the demo MLP with every built-in probe; write TensorBoard events under ``logdir/<run>``.

    Args:
        logdir: the parent of the run's directory.
        epochs: training epochs (default ``DEFAULT_EPOCHS``, ``SMOKE_EPOCHS`` with ``smoke``).
        smoke: a short run on fewer digits, probes 5 times as often (tests).
        progress: show the progress bar.
        out: where the text goes (default stdout).
        images: False: the probes' images off (``IMAGES_OFF``), to measure what they cost.
        result: filled with ``train_s`` (seconds from attach to the end of ``close``) and ``steps``.

    Returns:
        The exit code: 0, or 2 for a bad ``epochs`` or a ``logdir`` that cannot be written.
    """
    out = out or sys.stdout
    epochs = int(epochs) if epochs is not None else (SMOKE_EPOCHS if smoke else DEFAULT_EPOCHS)
    if epochs < 1:
        print(f"probes demo: --epochs must be at least 1, got {epochs}", file=sys.stderr)
        return 2
    # everything here is small (at most 200 x 200 matrices): one thread is faster than an OpenMP team, and
    # far faster when other processes share the cores (OpenMP spin-waits). Restored at the end.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(logdir, epochs, smoke, progress, out, images, result)
    finally:
        torch.set_num_threads(threads)


def _run(
    logdir: str,
    epochs: int,
    smoke: bool,
    progress: bool,
    out: Any,
    images: bool = True,
    result: dict[str, float] | None = None,
) -> int:
    from torch.utils.tensorboard import SummaryWriter

    import probes
    from probes.engine.session import ProbeFailedWarning

    torch.manual_seed(0)
    xtr, ytr, xte, yte, xp, yp = _split()
    if smoke:
        xtr, ytr = xtr[:500], ytr[:500]
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run = _new_run_folder(logdir)
    if run is None:
        return 2
    print(
        f"probes demo: ReLU MLP 64-64-32-10 on {xtr.shape[0]} digits ({xte.shape[0]} held out), "
        f"probe batch {xp.shape[0]}, {epochs} epochs -> {run}",
        file=out,
    )
    chosen = choose_probes(model, (xp, yp), smoke, out=out, images=images)
    listed = ", ".join(f"{n} (every {o.get('every')})" for n, o in chosen.items())
    print(f"  probes: {listed}", file=out)

    writer = SummaryWriter(log_dir=str(run))
    bar = Progress(epochs * math.ceil(xtr.shape[0] / BATCH), progress, out=out)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbeFailedWarning)  # reported after the bar, from session.failures
        session = probes.attach(
            model, chosen, probe_data=(xp, yp), writer=writer, sinks=["memory", "tensorboard"], optimizer=opt
        )
        try:
            step, own = _train(model, opt, (xtr, ytr, xte, yte), epochs, writer, bar)
        finally:
            bar.close()
            session.close()
            writer.close()
    seconds = time.perf_counter() - t0
    if result is not None:
        result.update(train_s=seconds, steps=step)
    _print_summary(session, chosen, own, step, seconds, out)
    for line in closing_lines(logdir):
        print(line, file=out)
    return 0


def _new_run_folder(logdir: str) -> Path | None:
    """A new folder ``<logdir>/mlp-<time>`` (``+2``, ``+3``, ... when taken), made before any training; None, with
    one line on stderr, when the logdir cannot be written (a line, not a traceback at the end)."""
    run = Path(logdir) / time.strftime("mlp-%Y%m%d-%H%M%S")
    suffix = 1
    while run.exists():
        suffix += 1
        run = run.with_name(f"{run.name.split('+')[0]}+{suffix}")
    try:
        run.mkdir(parents=True)
    except OSError as exc:
        print(
            f"probes demo: cannot write to --logdir {str(logdir)!r}: {exc.strerror or type(exc).__name__}",
            file=sys.stderr,
        )
        return None
    return run


def _train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: tuple[torch.Tensor, ...],
    epochs: int,
    writer: Any,
    bar: Progress,
) -> tuple[int, dict[str, tuple[int, float]]]:
    """The training loop (the session steps in the optimizer's post-hook): the number of steps, and the demo's own
    curves as written (``train/loss``, ``train/accuracy`` every 10 steps, ``test/accuracy`` per epoch)."""
    xtr, ytr, xte, yte = data
    g = torch.Generator().manual_seed(1)
    step = 0
    test_acc: float | None = None
    own: dict[str, tuple[int, float]] = {}
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(xtr.shape[0], generator=g)
        for i in range(0, xtr.shape[0], BATCH):
            idx = perm[i : i + BATCH]
            logits = model(xtr[idx])
            loss = F.cross_entropy(logits, ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 10 == 0:
                own["train/loss"] = (step, loss.item())
                own["train/accuracy"] = (step, (logits.argmax(1) == ytr[idx]).double().mean().item())
                for tag in ("train/loss", "train/accuracy"):
                    writer.add_scalar(tag, own[tag][1], step)
            tested = "" if test_acc is None else f" test acc {test_acc:.3f}"  # none before the first test
            bar.update(step, f"epoch {epoch}/{epochs} loss {loss.item():.3f}{tested}")
        model.eval()
        with torch.no_grad():
            test_acc = (model(xte).argmax(1) == yte).double().mean().item()
        model.train()
        writer.add_scalar("test/accuracy", test_acc, step)
        own["test/accuracy"] = (step, test_acc)
    bar.update(step, f"epoch {epochs}/{epochs} loss {loss.item():.3f} test acc {float(test_acc or 0):.3f}")
    return step, own


def _print_summary(
    session: Any, chosen: dict, own: dict[str, tuple[int, float]], step: int, seconds: float, out: Any
) -> None:
    """The last value of each key scalar (the session's memory sink and the demo's own curves), and each probe
    that failed."""
    last: dict[str, tuple[int, float]] = {}
    for tag, series in session.memory.scalars().items():
        last[tag] = series[-1]
    last.update(own)
    rows = [t for t in KEY_SCALARS if t in last]
    for name in chosen:  # a built-in probe without a listed key scalar still shows one
        if not any(t.startswith(name + "/") for t in rows):
            rows += sorted(t for t in last if t.startswith(name + "/"))[:1]
    width = max(len(t) for t in rows)
    print(f"\ntrained {step} steps in {seconds:.1f} s; last value of each key scalar:", file=out)
    print(f"  {'tag':<{width}}  {'step':>6}  value", file=out)
    for tag in rows:
        st, v = last[tag]
        print(f"  {tag:<{width}}  {st:>6}  {_format(float(v))}", file=out)
    for name, tb in session.failures.items():
        print(f"  probe {name} failed and was switched off: {tb.strip().splitlines()[-1]}", file=out)


def _venv_command(name: str, module: str) -> list[str]:
    """The command of console script ``name`` next to this Python (the venv's own), else ``python -m module``."""
    exe = Path(sys.executable).parent / name
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", module]


def tensorboard_command(logdir: str | Path) -> list[str]:
    """The command that opens TensorBoard on ``logdir`` and keeps every demo image (step 0 included)."""
    return [
        *_venv_command("tensorboard", "tensorboard.main"),
        "--logdir",
        str(Path(logdir).absolute()),
        "--samples_per_plugin",
        SAMPLES_PER_PLUGIN,
    ]


def closing_lines(logdir: str | Path) -> list[str]:
    """The demo's last lines: commands that work as printed (absolute paths, no activated venv needed)."""
    import shlex

    probes_cmd = _venv_command("probes", "probes")
    where = str(Path(logdir).absolute())
    return [
        "",
        f"open TensorBoard:  {shlex.join([*probes_cmd, 'tensorboard', where])}",
        f"  (the same as:    {shlex.join(tensorboard_command(logdir))})",
        f"or one HTML file:  {shlex.join([*probes_cmd, 'report', where, '-o', 'report.html'])}",
    ]
