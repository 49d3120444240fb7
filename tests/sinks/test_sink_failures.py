"""A sink's failure is the sink's, not the probes' (issue 27): a full disk, a deleted logdir or a sink that raises
gets one warning naming the sink, where it writes and the error; the probes stay on, every other sink gets every
record, training goes on, ``close()`` returns (it raises only with ``strict=True``), what was written stays
readable, and the sink writes again once it can."""

from __future__ import annotations

import errno
import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from tensorboard.summary.writer.record_writer import RecordWriter
from torch import nn

import probes
from probes.engine import output
from probes.engine.failures import ProbesNoticeWarning, SinkFailedWarning
from probes.engine.session import ProbesClosedError
from probes.sinks import Sink

#: the event writer's thread dies of the simulated disk error (as it does of a real one), and pytest reports it
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

PROBES = ["relu_zeros", "alignment", "margin", "patterns"]
STEPS = 30


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)


def attach(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = data()
    session = probes.attach(model, {n: {"every": 1} for n in PROBES}, probe_data=(x, y), overhead=None, **kw)
    return session, model, torch.optim.SGD(model.parameters(), lr=0.05)


def train(session, model, opt, steps, at=None):
    """``steps`` training steps; ``at[k]()`` runs after step k."""
    x, y = data()
    for k in range(1, steps + 1):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        session.step()
        if at and k in at:
            at[k]()


def every_record() -> set[tuple[str, int]]:
    """(tag, step) of every record a run of ``STEPS`` steps writes, with a memory sink alone."""
    session, model, opt = attach(sinks=["memory"])
    train(session, model, opt, STEPS)
    session.close()
    return {(r.tag, r.step) for r in session.memory.records}


def written(session) -> set[tuple[str, int]]:
    return {(r.tag, r.step) for r in session.memory.records}


def said(caught, category) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, category)]


def event_scalars(logdir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


class Disk:
    """The event writer's disk: ``fill()`` leaves room for part of one more record, which is written cut short
    before ``OSError(ENOSPC)``, as a real full disk does; ``free()`` makes room again."""

    def __init__(self, monkeypatch) -> None:
        self.room: int | None = None  # bytes left; None: plenty
        real, disk = RecordWriter.write, self

        def write(writer, data: bytes) -> None:
            framed = len(data) + 16  # length, its crc, the data, its crc
            if disk.room is None or framed <= disk.room:
                disk.room = None if disk.room is None else disk.room - framed
                return real(writer, data)
            inner = writer._writer

            class Cut:
                def write(self, chunk: bytes) -> None:
                    inner.write(chunk[: disk.room])
                    disk.room = 0
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            writer._writer = Cut()
            try:
                real(writer, data)
            finally:
                writer._writer = inner

        monkeypatch.setattr(RecordWriter, "write", write)

    def fill(self) -> None:
        self.room = 9

    def free(self) -> None:
        self.room = None


@pytest.fixture
def retry_now(monkeypatch):
    """A failed sink is tried again at its next step, however soon."""
    monkeypatch.setattr(output, "RETRY_SECONDS", 0.0)


def test_a_full_disk_is_the_sinks_failure_and_what_was_written_stays_readable(tmp_path, monkeypatch, retry_now):
    expected = every_record()
    disk, logdir = Disk(monkeypatch), tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session, model, opt = attach(logdir=str(logdir), sinks=["memory"])
        on_disk = {}

        def fill():
            session.flush()  # steps 0 to 10 are on disk
            on_disk.update(session.memory.scalars())
            disk.fill()

        train(session, model, opt, STEPS, at={10: fill, 20: disk.free})
        session.close()  # returns
    assert session.failures == {}
    assert all(session.enabled(n) for n in PROBES)
    assert written(session) == expected  # the memory sink has every record
    failed = said(caught, SinkFailedWarning)
    assert len(failed) == 1, failed
    assert "TensorBoardSink" in failed[0] and str(logdir) in failed[0], failed[0]
    assert "OSError" in failed[0] and "No space left on device" in failed[0], failed[0]
    back = [m for m in said(caught, ProbesNoticeWarning) if "writes again" in m]
    assert len(back) == 1 and str(logdir) in back[0], back

    # the event files: everything before the disk filled (the first file ends in a record cut short), then what
    # came once it had room again (a new event file)
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2
    events = event_scalars(logdir)
    assert set(on_disk) <= set(events)
    for tag, series in on_disk.items():
        for step, value in series:
            assert events[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)
        assert STEPS in events[tag], tag
        assert not any(11 <= step <= 20 for step in events[tag]), tag


def test_a_logdir_deleted_mid_run_is_made_again(tmp_path, retry_now):
    expected = every_record()
    logdir = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session, model, opt = attach(logdir=str(logdir), sinks=["memory"])

        def delete():
            session.flush()
            shutil.rmtree(logdir)

        train(session, model, opt, STEPS, at={10: delete})
        session.close()
    assert session.failures == {}
    assert written(session) == expected
    failed = said(caught, SinkFailedWarning)
    assert len(failed) == 1, failed
    assert "TensorBoardSink" in failed[0] and str(logdir) in failed[0] and "FileNotFoundError" in failed[0]
    assert any("writes again" in m for m in said(caught, ProbesNoticeWarning))
    events = event_scalars(logdir)  # the logdir again, with what came after
    assert all(STEPS in events[tag] for tag in session.memory.scalars()), events.keys()


class Flaky(Sink):
    """A sink whose writer fails while ``broken``; ``close`` raises with ``fail_close``."""

    where = "flaky://bucket/run"

    def __init__(self) -> None:
        self.got: set[tuple[str, int]] = set()
        self.broken = self.fail_close = self.closed = False

    def write(self, records, step):
        if self.broken:
            raise RuntimeError("the writer failed")
        self.got.update((r.tag, step) for r in records)

    def close(self):
        self.closed = True
        if self.fail_close:
            raise OSError(errno.EIO, "the upload failed")


def test_a_sink_that_raises_fails_alone_and_writes_again(retry_now):
    expected = every_record()
    flaky, other = Flaky(), Flaky()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session, model, opt = attach(sinks=[flaky, "memory", other])

        def brake():
            flaky.broken = True

        def mend():
            flaky.broken = False

        train(session, model, opt, STEPS, at={5: brake, 10: mend})
        flaky.fail_close = True
        session.close()  # returns: the close error is reported
    assert session.failures == {}
    assert written(session) == expected and other.got == expected  # every other sink got every record
    assert flaky.got == {(tag, step) for tag, step in expected if not 6 <= step <= 10}
    assert flaky.closed and other.closed
    failed = said(caught, SinkFailedWarning)
    assert len(failed) == 2, failed  # the writes from step 6, then the close
    assert "sink Flaky writing to flaky://bucket/run raised in write at step 6" in failed[0], failed[0]
    assert "RuntimeError: the writer failed" in failed[0]
    assert "raised in close" in failed[1] and "the upload failed" in failed[1], failed[1]
    back = [m for m in said(caught, ProbesNoticeWarning) if "writes again" in m]
    assert len(back) == 1 and "from step 11" in back[0] and "steps 6 to 10" in back[0], back


def test_strict_raises_the_sinks_error_without_blaming_a_probe():
    flaky, other = Flaky(), Flaky()
    session, model, opt = attach(sinks=[flaky, "memory", other], strict=True)
    train(session, model, opt, 2)
    flaky.broken = True
    with pytest.raises(RuntimeError, match="the writer failed") as info:
        train(session, model, opt, 1)
    notes = " ".join(getattr(info.value, "__notes__", []))
    if hasattr(info.value, "add_note"):  # Python >= 3.11
        assert "sink Flaky writing to flaky://bucket/run" in notes and "in probe" not in notes, notes
    assert session.failures == {} and all(session.enabled(n) for n in PROBES)
    assert any(step == 3 for _, step in other.got)  # the other sinks had the records before it raised
    flaky.broken, flaky.fail_close = False, True
    with pytest.raises(OSError, match="the upload failed"):
        session.close()
    assert session.closed and other.closed
    with pytest.raises(ProbesClosedError):
        session.step()


@pytest.mark.parametrize("strict", [False, True])
def test_an_event_writer_failing_at_close(tmp_path, monkeypatch, strict):
    """The event writer writes in a thread: a full disk may first show at the flush of ``close()``."""
    session, model, opt = attach(logdir=str(tmp_path / "run"), sinks=["memory"], strict=strict)
    train(session, model, opt, 3)

    def flush(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(RecordWriter, "flush", flush)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if strict:
            with pytest.raises(OSError, match="No space left on device") as info:
                session.close()
            notes = " ".join(getattr(info.value, "__notes__", []))
            if hasattr(info.value, "add_note"):  # Python >= 3.11: the error says which sink and where
                assert f"sink TensorBoardSink writing to {tmp_path / 'run'}" in notes, notes
        else:
            session.close()
    assert session.closed and session.failures == {}
    failed = said(caught, SinkFailedWarning)
    assert failed == [] if strict else (len(failed) == 1 and "raised in close" in failed[0]), failed
