"""The harness every probe's tests run, built-in and third party (torchmetrics' ``MetricTester`` idea).

``check_probe(MyProbe, {"option": 1})`` runs, on a small ReLU MLP (or your ``model=`` factory) and a
seeded probe batch:

- ``check_training_unchanged``: the same seeds give bit-identical parameters with and without the probe;
- ``check_records``: finite values (or documented NaN), tags that start with the probe's name and are the
  same from one run to the next;
- ``check_state_round_trip``: ``state_dict`` -> a fresh session's ``load_state_dict`` -> the same state
  and the same records as an uninterrupted run;
- ``check_failure_isolation``: a probe that raises is switched off, reported once, and training goes on
  bit-identically;
- ``check_ddp_flush`` (``ddp=True``): 2 gloo processes, each on half of every batch, write what one
  process writes on the union (passive probes; declared state is reduced by the session).

Factories must be importable (module-level) for the DDP check, which starts processes.
"""

from __future__ import annotations

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
from probes.probe import Probe

__all__ = ["check_probe", "check_training_unchanged", "check_records", "check_state_round_trip",
           "check_failure_isolation", "check_ddp_flush", "small_mlp", "default_data", "run_ranks", "join_group",
           "leave_group"]

STEPS = 12
EVERY = 3


def small_mlp() -> nn.Module:
    """8 -> 16 -> 16 -> 3 with ReLU, seeded by the caller."""
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def default_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training inputs (STEPS x 16 x 8), targets, a probe batch (24 x 8) and its labels (three classes)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS, 16, 8, generator=g)
    t = torch.randint(0, 3, (STEPS, 16), generator=g)
    px = torch.randn(24, 8, generator=g)
    py = torch.arange(24) % 3
    return x, t, px, py


def _spec(cls: type[Probe], options: Mapping[str, Any] | None) -> dict[Any, Any]:
    opts = {"every": EVERY, **dict(options or {})}
    return {cls: opts}


def _train(cls: type[Probe] | None, options: Mapping[str, Any] | None, model: Callable[[], nn.Module],
           steps: int = STEPS, state: Mapping[str, Any] | None = None, start: int = 0,
           rank: int | None = None, world: int = 1, params: dict[str, torch.Tensor] | None = None
           ) -> tuple[nn.Module, Any]:
    x, t, px, py = default_data()
    torch.manual_seed(0)
    net = model()
    if params is not None:
        net.load_state_dict(params)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    session = None
    if cls is not None:
        session = probes.attach(net, _spec(cls, options), probe_data=(px, py), sinks=["memory"], state=state)
    for s in range(start, start + steps):
        xb, tb = x[s % STEPS], t[s % STEPS]
        if rank is not None:
            half = xb.shape[0] // world
            xb, tb = xb[rank * half:(rank + 1) * half], tb[rank * half:(rank + 1) * half]
        torch.randint(0, 10, (3,))  # the global RNG: probes must leave it untouched
        loss = F.cross_entropy(net(xb), tb)
        loss.backward()
        if rank is not None:
            for p in net.parameters():  # DDP by hand: average the gradients
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad()
        if session is not None:
            session.step()
    return net, session


def _records(session: Any) -> dict[str, list[tuple[int, float]]]:
    return session.memory.scalars() if session is not None and session.sinks else {}


def check_training_unchanged(cls: type[Probe], options: Mapping[str, Any] | None = None,
                             model: Callable[[], nn.Module] = small_mlp) -> None:
    ref, _ = _train(None, None, model)
    got, session = _train(cls, options, model)
    session.close()
    assert not session.failures, f"{cls.name}: failed during the run: {session.failures}"
    for (name, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), f"{cls.name}: training changed ({name} differs with the probe attached)"


def check_records(cls: type[Probe], options: Mapping[str, Any] | None = None,
                  model: Callable[[], nn.Module] = small_mlp, allow_nan: tuple[str, ...] = ()) -> set[str]:
    """Every record finite (tags in ``allow_nan`` may be NaN), tags under the probe's name and stable."""
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


def check_state_round_trip(cls: type[Probe], options: Mapping[str, Any] | None = None,
                           model: Callable[[], nn.Module] = small_mlp) -> None:
    """Stop mid-window, save, resume in a fresh session: the state and the later records match an unbroken run."""
    split = EVERY + 1  # mid-window for passive probes
    whole, ws = _train(cls, options, model)
    first, s1 = _train(cls, options, model, steps=split)
    state = s1.state_dict()
    s1.close()
    state_copy = {"step": state["step"], "probes": state["probes"]}
    params = {k: v.clone() for k, v in first.state_dict().items()}
    # the optimizer restarts in this check: compare the probe's own bookkeeping, not the trajectory
    _, s2 = _train(cls, options, model, steps=0, state=state_copy, start=split, params=params)
    assert s2.global_step == split, f"{cls.name}: the step did not survive the round trip"
    assert _equal(s2.probes[cls.name].state_dict(), state["probes"][cls.name]), \
        f"{cls.name}: state_dict -> load_state_dict -> state_dict changed the state"
    s2.close()
    ws.close()


def check_failure_isolation(cls: type[Probe], options: Mapping[str, Any] | None = None,
                            model: Callable[[], nn.Module] = small_mlp) -> None:
    """A probe that raises is switched off once, training goes on unchanged, other probes keep working."""
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


def join_group(rank: int, world: int, root: str, timeout_s: float = 60) -> None:
    """Join a gloo process group rendezvousing through the file ``root/pg`` (one thread per rank)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=timeout_s))
    torch.set_num_threads(1)


def leave_group() -> None:
    """Leave together: a barrier, then ``destroy_process_group`` (a rank that tears gloo down early aborts others)."""
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


def run_ranks(worker: Callable[..., None], args: tuple[Any, ...] = (), world: int = 2,
              deadline_s: float = 120) -> None:
    """Run ``worker(rank, *args)`` in ``world`` spawned processes; raise if one fails, or after ``deadline_s``.

    ``worker`` must be importable (module-level). A worker that fails raises here with its traceback; a hang
    (a collective some rank never joins) raises ``TimeoutError`` instead of blocking the caller.
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


def check_ddp_flush(cls: type[Probe], options: Mapping[str, Any] | None = None,
                    model: Callable[[], nn.Module] = small_mlp, world: int = 2, rel: float = 1e-6) -> None:
    """2 gloo processes on halves of every batch write what one process writes on the whole batches."""
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
            assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b)), \
                f"{cls.name}: {tag} = {a} under DDP, {b} in one process"


def check_probe(cls: type[Probe], options: Mapping[str, Any] | None = None, *,
                model: Callable[[], nn.Module] = small_mlp, ddp: bool = False,
                allow_nan: tuple[str, ...] = ()) -> None:
    """Run every check above on ``cls`` with ``options`` (``ddp=True`` adds the 2-process check)."""
    check_training_unchanged(cls, options, model)
    check_records(cls, options, model, allow_nan)
    check_state_round_trip(cls, options, model)
    check_failure_isolation(cls, options, model)
    if ddp:
        check_ddp_flush(cls, options, model)


def probe_batch(model: nn.Module, x: Any, y: torch.Tensor | None = None, *, step: int = 0, output: Any = None,
                probe_batch_size: int | None = None, site_types: tuple[type[nn.Module], ...] = ()) -> Any:
    """A ``ProbeBatch`` for calling a probe's ``measure`` by hand, as the session would build it: the model's output
    on ``x`` (no gradients, eval mode) and a probe pass for ``batch.run`` over a capture of its own.

    Args:
        model: the model.
        x: the probe inputs (a tensor, a tuple for ``model(*x)`` or a dict for ``model(**x)``).
        y: the labels, or None.
        step: the step the batch reports.
        output: the ``attach(output=...)`` option.
        probe_batch_size: samples per chunk of the probe passes (None: one pass).
        site_types: extra module types to treat as sites, as a session takes them from its probes' ``site_types``
            (e.g. ``LinearRegion.site_types``).

    Returns:
        A ``probes.ProbeBatch`` without site activations (``needs_sites`` probes get them through a session).
    """
    from probes.engine.probe_pass import standalone_batch

    return standalone_batch(model, x, y, step=step, output=output, probe_batch_size=probe_batch_size,
                            site_types=site_types)
