"""The harness every probe's tests run, built-in and third party (torchmetrics' ``MetricTester`` idea).

``check_probe(MyProbe, {"option": 1})`` runs, on a small ReLU MLP (or your ``model=`` factory) and a
seeded probe batch:

- ``check_contract``: the class declares the contract once (``needs`` a ``Needs``, not mixed with the old flags or
  hooks; ``Options`` a dataclass of fields with defaults, each declared with ``probes.options.option``);
- ``check_training_unchanged``: the same seeds give bit-identical parameters with and without the probe;
- ``check_records``: finite values (or documented NaN), tags that start with the probe's name and are the
  same from one run to the next;
- ``check_state_round_trip``: stop mid-window, ``state_dict`` -> a fresh session's ``load_state_dict`` -> the same
  state, and the resumed run writes the records of an uninterrupted run after the stop (model and optimizer restored);
- ``check_failure_isolation``: a probe that raises is switched off, reported once, and training goes on
  bit-identically;
- ``check_ddp_flush`` (``ddp=True``): 2 gloo processes, each on half of every batch, write what one
  process writes on the union (passive probes; declared state is reduced by the session);
- ``check_follows_model`` (active probes): after ``model.double()`` (or another move) the probe measures what it
  measures when attached afresh to the moved model.

``check_probe`` ends with one printed line saying which checks passed (its return value too).

``probe_batch(model, x, y)`` builds the ``ProbeBatch`` a session would hand ``measure``, for tests of one measurement.

Factories must be importable (module-level) for the DDP check, which starts processes.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import probes
from probes.probe import Needs, Probe

__all__ = [
    "check_probe",
    "check_contract",
    "check_training_unchanged",
    "check_records",
    "check_state_round_trip",
    "check_failure_isolation",
    "check_ddp_flush",
    "check_follows_model",
    "probe_batch",
    "small_mlp",
    "default_data",
    "run_ranks",
    "join_group",
    "leave_group",
]

STEPS = 12
EVERY = 3


def small_mlp() -> nn.Module:
    """The default model of the checks: 8 -> 16 -> 16 -> 3 with ReLU (the caller seeds it).

    Returns:
        A fresh ``nn.Sequential``.
    """
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def default_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seeded data of the checks.

    Returns:
        Training inputs (STEPS x 16 x 8), their targets (STEPS x 16, three classes), a probe batch (24 x 8) and its
        labels (24, three classes).
    """
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS, 16, 8, generator=g)
    t = torch.randint(0, 3, (STEPS, 16), generator=g)
    px = torch.randn(24, 8, generator=g)
    py = torch.arange(24) % 3
    return x, t, px, py


def _spec(cls: type[Probe], options: Mapping[str, Any] | None, every: int = EVERY) -> dict[Any, Any]:
    opts = {"every": every, **dict(options or {})}
    return {cls: opts}


def _train(
    cls: type[Probe] | None,
    options: Mapping[str, Any] | None,
    model: Callable[[], nn.Module],
    steps: int = STEPS,
    state: Mapping[str, Any] | None = None,
    start: int = 0,
    rank: int | None = None,
    world: int = 1,
    params: dict[str, torch.Tensor] | None = None,
    opt_state: dict[str, Any] | None = None,
    saved: dict[str, Any] | None = None,
    on_attach: Callable[[Any], None] | None = None,
) -> tuple[nn.Module, Any]:
    """Train ``steps`` SGD steps from ``start`` with ``cls`` attached (None: no probe); ``params`` / ``opt_state``
    resume the model and the optimizer, ``saved["optimizer"]`` receives the optimizer's state at the end."""
    x, t, px, py = default_data()
    torch.manual_seed(0)
    net = model()
    if params is not None:
        net.load_state_dict(params)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    session = None
    if cls is not None:
        session = probes.attach(net, _spec(cls, options), probe_data=(px, py), sinks=["memory"], state=state)
        if on_attach is not None:
            on_attach(session)
    for s in range(start, start + steps):
        xb, tb = x[s % STEPS], t[s % STEPS]
        if rank is not None:
            half = xb.shape[0] // world
            xb, tb = xb[rank * half : (rank + 1) * half], tb[rank * half : (rank + 1) * half]
        torch.randint(0, 10, (3,))  # the global RNG: probes must leave it untouched
        loss = F.cross_entropy(net(xb), tb)
        loss.backward()
        if rank is not None:
            for p in net.parameters():  # DDP by hand: average the gradients
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
        opt.zero_grad()
        if session is not None:
            session.step()
    if saved is not None:
        saved["optimizer"] = copy.deepcopy(opt.state_dict())
    return net, session


def _records(session: Any) -> dict[str, list[tuple[int, float]]]:
    return session.memory.scalars() if session is not None and session.sinks else {}


def check_training_unchanged(
    cls: type[Probe], options: Mapping[str, Any] | None = None, model: Callable[[], nn.Module] = small_mlp
) -> None:
    """The same seeds give bit-identical parameters with and without the probe attached.

    Args:
        cls: the probe class.
        options: its options (``every`` defaults to 3).
        model: a factory of the model (module-level for the DDP check).

    Raises:
        AssertionError: the probe failed, or a parameter differs.
    """
    ref, _ = _train(None, None, model)
    got, session = _train(cls, options, model)
    session.close()
    assert not session.failures, f"{cls.name}: failed during the run: {session.failures}"
    for (name, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), f"{cls.name}: training changed ({name} differs with the probe attached)"


def check_records(
    cls: type[Probe],
    options: Mapping[str, Any] | None = None,
    model: Callable[[], nn.Module] = small_mlp,
    allow_nan: tuple[str, ...] = (),
) -> set[str]:
    """Every record finite (tags in ``allow_nan`` may be NaN), tags under the probe's name and the same in two runs.

    Args:
        cls: the probe class.
        options: its options.
        model: a factory of the model.
        allow_nan: scalar tags that may be NaN (documented, e.g. an average over an empty set).

    Returns:
        The tags written.

    Raises:
        AssertionError: a failure, a non-finite value, a tag outside ``<name>/``, nothing written, or other tags
            in the second run.
    """
    tags = []
    for _ in range(2):
        _, session = _train(cls, options, model)
        session.close()
        assert not session.failures, f"{cls.name}: failed during the run: {session.failures}"
        mem = session.memory
        for tag, points in mem.scalars().items():
            assert tag.startswith(cls.name + "/"), f"{cls.name}: tag {tag!r} is not under '{cls.name}/'"
            for step, value in points:
                assert math.isfinite(value) or tag in allow_nan, f"{cls.name}: {tag} = {value} at step {step}"
        tags.append(mem.tags())
    assert tags[0], f"{cls.name}: wrote nothing in {STEPS} steps at every={EVERY}"
    assert tags[0] == tags[1], f"{cls.name}: tags differ from one run to the next: {tags[0] ^ tags[1]}"
    return tags[0]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        a, b = a.cpu(), b.cpu()
        same = torch.equal(a, b)
        return same or (a.is_floating_point() and bool(torch.isclose(a, b, 0.0, 0.0, equal_nan=True).all()))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _same_value(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=rel * 1e-3) or (math.isnan(a) and math.isnan(b))


def check_state_round_trip(
    cls: type[Probe],
    options: Mapping[str, Any] | None = None,
    model: Callable[[], nn.Module] = small_mlp,
    rel: float = 1e-9,
) -> None:
    """Stop mid-window, save, resume in a fresh session: the state survives and the resumed run writes, after the
    stop, the records of an unbroken run.

    The first run stops after ``EVERY + 1`` steps (inside a window of a passive probe); the resumed run restores the
    model, the optimizer and the session's ``state_dict`` (through ``attach(state=...)``) and trains to the end, so
    its training is the unbroken run's, bit for bit (checked first).

    Args:
        cls: the probe class.
        options: its options.
        model: a factory of the model.
        rel: the relative tolerance on each value (the same computation on the same parameters: rounding only).

    Raises:
        AssertionError: the step or the state changed in the round trip, the resumed run wrote a point at or
            before the stop, or a point after it differs from the unbroken run's (other steps, other values, a
            missing or an extra tag).
    """
    split = EVERY + 1  # mid-window for passive probes
    whole, ws = _train(cls, options, model)
    ws.close()
    assert not ws.failures, f"{cls.name}: failed during the unbroken run: {ws.failures}"
    saved: dict[str, Any] = {}
    first, s1 = _train(cls, options, model, steps=split, saved=saved)
    state = s1.state_dict()
    s1.close()
    state_copy = {"step": state["step"], "probes": copy.deepcopy(state["probes"])}
    params = {k: v.clone() for k, v in first.state_dict().items()}

    def right_after_attach(s2: Any) -> None:
        assert s2.global_step == split, f"{cls.name}: the step did not survive the round trip"
        assert _equal(s2.probes[cls.name].state_dict(), state["probes"][cls.name]), (
            f"{cls.name}: state_dict -> load_state_dict -> state_dict changed the state"
        )

    resumed, s2 = _train(
        cls,
        options,
        model,
        steps=STEPS - split,
        state=state_copy,
        start=split,
        params=params,
        opt_state=saved["optimizer"],
        on_attach=right_after_attach,
    )
    s2.close()
    assert not s2.failures, f"{cls.name}: failed in the resumed run: {s2.failures}"
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"harness: the resumed training differs from the unbroken one ({name})"
    expected = {tag: [(step, v) for step, v in points if step > split] for tag, points in _records(ws).items()}
    expected = {tag: points for tag, points in expected.items() if points}
    got = _records(s2)
    early = {tag: [step for step, _ in points if step <= split] for tag, points in got.items()}
    early = {tag: steps for tag, steps in early.items() if steps}
    assert not early, f"{cls.name}: the resumed run wrote points at or before step {split} again: {early}"
    assert set(got) == set(expected), (
        f"{cls.name}: after resuming, tags differ from the unbroken run's: {sorted(set(got) ^ set(expected))}"
    )
    for kind in ("histograms", "images"):  # the steps of the other records too (an image cadence is state)
        want_steps = {tag: [r.step for r in recs if r.step > split] for tag, recs in getattr(ws.memory, kind)().items()}
        got_steps = {tag: [r.step for r in recs] for tag, recs in getattr(s2.memory, kind)().items()}
        assert got_steps == {tag: steps for tag, steps in want_steps.items() if steps}, (
            f"{cls.name}: {kind} written at steps {got_steps} after resuming, {want_steps} in the unbroken run"
        )
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], (
            f"{cls.name}: {tag} written at steps {[s for s, _ in got[tag]]} after resuming, "
            f"{[s for s, _ in points]} in the unbroken run"
        )
        for (step, a), (_, b) in zip(got[tag], points):
            assert _same_value(a, b, rel), f"{cls.name}: {tag} = {a} at step {step} after resuming, {b} unbroken"


def check_failure_isolation(
    cls: type[Probe], options: Mapping[str, Any] | None = None, model: Callable[[], nn.Module] = small_mlp
) -> None:
    """A probe that raises during training is switched off, reported once, and training goes on bit-identically.

    The failure is injected into ``observe`` (passive probes) or into ``measure`` after attach (active probes: a
    failure at attach makes ``attach`` raise instead).

    Args:
        cls: the probe class.
        options: its options.
        model: a factory of the model.

    Raises:
        AssertionError: the failure was not reported, reported more than once, or training changed.
    """
    method = "observe" if cls.passive else "measure"
    original = getattr(cls, method)

    class Failing(cls):  # type: ignore[misc, valid-type]
        pass

    def boom(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not cls.passive and getattr(args[0] if args else None, "step", 1) == 0:
            return original(self, *args, **kwargs)  # a failure at attach makes attach raise: fail in training
        raise RuntimeError(f"{cls.name}: injected failure")

    setattr(Failing, method, boom)
    ref, _ = _train(None, None, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, session = _train(Failing, options, model)
        session.close()
    assert cls.name in session.failures, f"{cls.name}: an injected failure was not reported"
    reports = [w for w in caught if "injected failure" in str(w.message)]
    assert len(reports) == 1, f"{cls.name}: the failure was reported {len(reports)} times, not once"
    for a, b in zip(ref.state_dict().values(), got.state_dict().values()):
        assert torch.equal(a, b), f"{cls.name}: a failing probe changed training"


def check_follows_model(
    cls: type[Probe],
    options: Mapping[str, Any] | None = None,
    model: Callable[[], nn.Module] = small_mlp,
    move: Callable[[nn.Module], Any] | None = None,
    references: tuple[str, ...] = (),
    rel: float = 1e-9,
) -> None:
    """After the model moves (``model.double()`` by default; ``.half()``, ``.to(device)``), an attached probe
    measures what it measures when attached afresh to the moved model: its caches follow the model.

    Args:
        cls: an active probe class (passive probes see the training forwards themselves: nothing to check).
        options: its options.
        model: a factory of the model.
        move: what is done to the model after attach (in place, as ``nn.Module.double`` does).
        references: scalar tags (fnmatch patterns) that compare with what the probe kept from before the move
            (a first kernel, a first snapshot): they must be finite, not equal to a fresh attach's.
        rel: the relative tolerance of the other values.

    Raises:
        AssertionError: the probe failed after the move, or wrote other tags or other values than a fresh attach.
    """
    import fnmatch

    if cls.passive:
        return
    move = move or (lambda m: m.double())
    _, _, px, py = default_data()
    torch.manual_seed(0)
    net = model()
    moved = probes.attach(net, _spec(cls, options, every=1), probe_data=(px, py), sinks=["memory"], strict=True)
    move(net)
    moved.step()  # a measurement at step 1, on the moved model (strict: a failure raises here)
    fresh = probes.attach(
        copy.deepcopy(net), _spec(cls, options, every=1), probe_data=(px, py), sinks=["memory"], strict=True
    )
    got = {tag: points[-1] for tag, points in _records(moved).items()}
    want = {tag: points[-1] for tag, points in _records(fresh).items()}
    moved.close()
    fresh.close()
    assert set(got) == set(want), (
        f"{cls.name}: after the move, tags differ from a fresh attach's: {sorted(set(got) ^ set(want))}"
    )
    for tag, (step, value) in got.items():
        assert step == 1, f"{cls.name}: {tag} was not measured after the move (last point at step {step})"
        if any(fnmatch.fnmatchcase(tag, pattern) for pattern in references):
            assert math.isfinite(value), f"{cls.name}: {tag} = {value} after the move"
        else:
            assert _same_value(value, want[tag][1], rel), (
                f"{cls.name}: {tag} = {value} after the move, {want[tag][1]} attached afresh to the moved model"
            )


def join_group(rank: int, world: int, root: str, timeout_s: float = 60) -> None:
    """Join a gloo process group rendezvousing through the file ``root/pg`` (one thread per rank).

    Args:
        rank: this process's rank.
        world: the number of processes.
        root: a directory shared by the processes (the rendezvous file ``root/pg`` is created there).
        timeout_s: how long collectives wait before raising.
    """
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{root}/pg",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    torch.set_num_threads(1)


def leave_group() -> None:
    """Leave the process group together: a barrier, then ``destroy_process_group`` (a rank that tears gloo down
    early aborts the others)."""
    try:
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _rank_main(rank: int, worker: Callable[..., None], args: tuple[Any, ...]) -> None:
    worker(rank, *args)
    # The worker returned: its results are on disk and it has left the group. End the process here, without the
    # interpreter's teardown, where gloo's threads can still abort the process now and then ("terminate called
    # without an active exception", SIGABRT) after everything succeeded. An exception skips this and is reported.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(worker: Callable[..., None], args: tuple[Any, ...] = (), world: int = 2, deadline_s: float = 120) -> None:
    """Run ``worker(rank, *args)`` in ``world`` spawned processes; raise if one fails, or after ``deadline_s``.

    Args:
        worker: an importable (module-level) function ``worker(rank, *args)``.
        args: its further arguments (picklable).
        world: the number of processes.
        deadline_s: how long to wait for all of them.

    Raises:
        RuntimeError: no gloo backend in this torch.
        Exception: a worker failed (raised here with its traceback, by ``torch.multiprocessing``).
        TimeoutError: the workers did not finish in ``deadline_s`` (a collective some rank never joined).
    """
    import torch.multiprocessing as mp

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        raise RuntimeError("run_ranks needs torch.distributed with the gloo backend")
    ctx = mp.spawn(_rank_main, args=(worker, tuple(args)), nprocs=world, join=False)
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} workers did not finish in {deadline_s:.0f} s (a hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def _ddp_worker(rank: int, world: int, root: str, cls: type[Probe], options: Any, model: Any) -> None:
    join_group(rank, world, root)
    try:
        _, session = _train(cls, options, model, rank=rank, world=world)
        session.close()
        if rank == 0:
            torch.save({"scalars": _records(session), "failures": sorted(session.failures)}, f"{root}/out.pt")
    finally:
        leave_group()


def check_ddp_flush(
    cls: type[Probe],
    options: Mapping[str, Any] | None = None,
    model: Callable[[], nn.Module] = small_mlp,
    world: int = 2,
    rel: float = 1e-6,
) -> None:
    """2 gloo processes, each on half of every batch, write what one process writes on the whole batches.

    Args:
        cls: the probe class (a passive probe: its declared state is reduced over the ranks).
        options: its options.
        model: an importable (module-level) factory of the model.
        world: the number of processes.
        rel: the relative tolerance of the values (sums in another order).

    Raises:
        AssertionError: a failure under DDP, other tags, other steps or other values than one process writes.
    """
    _, single = _train(cls, options, model)
    single.close()
    with tempfile.TemporaryDirectory() as root:
        run_ranks(_ddp_worker, (world, root, cls, dict(options or {}), model), world=world)
        out = torch.load(os.path.join(root, "out.pt"), weights_only=True)
    assert out["failures"] == [], f"{cls.name}: failed under DDP: {out['failures']}"
    expected = _records(single)
    assert set(out["scalars"]) == set(expected), f"{cls.name}: DDP tags differ: {set(out['scalars']) ^ set(expected)}"
    for tag, points in expected.items():
        got = out["scalars"][tag]
        assert [s for s, _ in got] == [s for s, _ in points], f"{cls.name}: {tag} written at other steps under DDP"
        for (_, a), (_, b) in zip(got, points):
            assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b)), (
                f"{cls.name}: {tag} = {a} under DDP, {b} in one process"
            )


def check_contract(cls: type[Probe]) -> None:
    """The class declares the probe contract once: ``needs`` is a ``Needs`` (built from the old flags where the class
    uses them), the old and the new contract are not mixed (``probes.legacy.contract_error``), and ``Options``, when
    declared, is a dataclass whose fields all have defaults and carry their check (``probes.options.option``).

    Args:
        cls: the probe class.

    Raises:
        AssertionError: what is wrong and what to change.
    """
    from probes import legacy

    who = cls.name or cls.__name__
    error = legacy.contract_error(cls, who)
    assert error is None, str(error)
    assert isinstance(cls.needs, Needs), f"{who}: needs must be a probes.Needs, got {cls.needs!r}"
    if cls.Options is None:
        return
    assert dataclasses.is_dataclass(cls.Options), f"{who}: Options must be a dataclass"
    for f in dataclasses.fields(cls.Options):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        assert has_default, f"{who}: option {f.name!r} has no default; declare it with probes.options.option(default)"
        assert "check" in f.metadata, f"{who}: option {f.name!r} is not declared with probes.options.option"


def check_probe(
    cls: type[Probe],
    options: Mapping[str, Any] | None = None,
    *,
    model: Callable[[], nn.Module] = small_mlp,
    ddp: bool = False,
    allow_nan: tuple[str, ...] = (),
    references: tuple[str, ...] = (),
    quiet: bool = False,
) -> str:
    """Run every check of this module on ``cls`` with ``options``, and say in one line what passed.

    Args:
        cls: the probe class.
        options: its options (``every`` defaults to 3).
        model: a factory of the model (module-level when ``ddp=True``).
        ddp: add the 2-process check ``check_ddp_flush``.
        allow_nan: scalar tags that may be NaN.
        references: for ``check_follows_model``, tags that compare with state kept from before a move of the model.
        quiet: do not print the summary line (it is returned all the same).

    Returns:
        The summary, also printed: ``check_probe(MyProbe): 5 checks passed (training unchanged, ...)``.

    Raises:
        AssertionError: the first check that fails, with a message naming the probe and what differs.
    """
    check_contract(cls)  # a precondition of the others, not counted among them
    passed: list[str] = []
    check_training_unchanged(cls, options, model)
    passed.append("training unchanged")
    check_records(cls, options, model, allow_nan)
    passed.append("records")
    check_state_round_trip(cls, options, model)
    passed.append("state round trip")
    check_failure_isolation(cls, options, model)
    passed.append("failure isolation")
    if not cls.passive:  # passive probes see the training forwards themselves: nothing to follow
        check_follows_model(cls, options, model, references=references)
        passed.append("follows the model")
    if ddp:
        check_ddp_flush(cls, options, model)
        passed.append("DDP flush")
    summary = f"check_probe({cls.__name__}): {len(passed)} checks passed ({', '.join(passed)})"
    if not quiet:
        print(summary)
    return summary


def probe_batch(
    model: nn.Module,
    x: Any,
    y: torch.Tensor | None = None,
    *,
    step: int = 0,
    output: Any = None,
    probe_batch_size: int | None = None,
    site_types: tuple[type[nn.Module], ...] = (),
    optimizer: Any = None,
) -> Any:
    """A ``ProbeBatch`` for calling a probe's ``check`` or ``measure`` by hand, as the session would build it: the
    model's output on ``x`` (no gradients, eval mode) and a probe pass for ``batch.context.run`` over a capture of its
    own.

    Args:
        model: the model.
        x: the probe inputs (a tensor, a tuple for ``model(*x)`` or a dict for ``model(**x)``).
        y: the labels, or None.
        step: the step the batch reports.
        output: the ``attach(output=...)`` option.
        probe_batch_size: samples per chunk of the probe passes (None: one pass).
        site_types: extra module types to treat as sites, as a session takes them from its probes'
            ``needs.site_types`` (e.g. ``LinearRegion.needs.site_types``).
        optimizer: the optimizer a session would be given (``batch.context.optimizer``).

    Returns:
        A ``probes.ProbeBatch`` without site activations (probes with ``Needs(sites=...)`` get them through a
        session).
    """
    from probes.engine.probe_pass import standalone_batch

    return standalone_batch(
        model,
        x,
        y,
        step=step,
        output=output,
        probe_batch_size=probe_batch_size,
        site_types=site_types,
        optimizer=optimizer,
    )
