"""A drawing process: a fresh Python interpreter (running ``probes.sinks.drawer.main``, started with ``subprocess``,
never forked from the training process) that runs drawing functions for the TensorBoard sink, so matplotlib never
holds the training process's interpreter lock.

It imports matplotlib as it starts (while training goes on), then answers calls one at a time over its standard
input and output: a length-prefixed pickle of ``(function, args, kwargs)`` in, ``("ok", result)`` or ``("error",
message)`` out. The functions are module-level drawing functions of this package and their arguments host arrays
(the pickles are ours, made and read by the two processes of one run; nothing a user saved is read). It inherits
no descriptor of the training process, and it ends when its input closes: when the sink's process ends, however it
ends (``os._exit`` in a torchrun worker included).
"""

from __future__ import annotations

import atexit
import os
import pickle
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

_HEADER = struct.Struct("<Q")


class DrawerStopped(RuntimeError):
    """The drawing process ended or could not be started."""


class NotDrawable(RuntimeError):
    """The drawing process cannot load this function (a module only this process has): draw it here instead."""


def _send(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive_bytes(stream: BinaryIO) -> bytes:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    (n,) = _HEADER.unpack(head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return data


def _receive(stream: BinaryIO) -> Any:
    return pickle.loads(_receive_bytes(stream))  # noqa: S301 - written by the other process of this run


class Drawer:
    """The parent's side: ``submit(fn, *args, **kwargs)`` runs ``fn`` in the drawing process (one call at a time)
    and returns a completed ``Future``; a stopped process raises ``DrawerStopped`` from its ``result()``."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)  # the modules this process can import, that one can too
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([package_root, *filter(None, sys.path)]))
        env.setdefault("MPLBACKEND", "Agg")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from probes.sinks.drawer import main; main()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                close_fds=True,
            )
        except OSError as exc:
            raise DrawerStopped(f"the drawing process could not start: {exc!r}") from exc
        self._lock = threading.Lock()
        atexit.register(self.shutdown, True)  # at exit: close its input and let it end

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            try:
                _send(self._proc.stdin, (fn, args, kwargs))
                status, value = _receive(self._proc.stdout)
            except (OSError, EOFError, ValueError) as exc:
                future.set_exception(DrawerStopped(f"the drawing process stopped ({exc!r})"))
                return future
        if status == "ok":
            future.set_result(value)
        else:
            future.set_exception(NotDrawable(value) if status == "unavailable" else RuntimeError(value))
        return future

    def shutdown(self, wait: bool = False) -> None:
        """Close its input (it then ends), and wait for it with ``wait``."""
        with self._lock:
            for stream in (self._proc.stdin, self._proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        if wait:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def main() -> None:
    """The drawing process's loop (see the module docstring)."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a print in a drawing function must not mix into the answers
    try:
        from probes import figures

        with figures.style():
            figures.new_figure(8, 8)  # matplotlib's import and fonts, before the first image
    except Exception:  # noqa: BLE001 - the first call will say what is wrong
        pass
    while True:
        try:
            data = _receive_bytes(stdin)
        except EOFError:
            return
        try:
            fn, args, kwargs = pickle.loads(data)  # noqa: S301 - written by the sink of this run
        except Exception as exc:  # noqa: BLE001 - a function of a module only the training process has
            answer: tuple[str, Any] = ("unavailable", f"{type(exc).__name__}: {exc}")
        else:
            try:
                answer = ("ok", fn(*args, **kwargs))
            except Exception as exc:  # noqa: BLE001 - reported to the sink, which reports it once
                answer = ("error", f"{type(exc).__name__}: {exc}")
        try:
            _send(stdout, answer)
        except OSError:
            return


if __name__ == "__main__":
    main()
