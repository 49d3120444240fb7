"""The drawing process: a fresh Python interpreter (running ``probes.app.render.background.main``, started with
``subprocess``, never forked from the training process) that draws picture data for the renderer, so matplotlib
never holds the training process's interpreter lock.

It imports matplotlib as it starts (while training goes on), then answers one picture at a time over its standard
input and output. Both ways a message is a JSON header and raw byte blocks, each length-prefixed: in, the kind's
name (``probes.records.FIGURE_KINDS``) and its fields, every array a block (dtype and shape in the header); out,
``{"ok": [h, w]}`` with the pixels and their PNG, or ``{"error": message}``. Nothing is pickled and no function is
named: the data is plain arrays, numbers and strings. It inherits no descriptor of the training process, and it
ends when its input closes: when the training process ends, however it ends (``os._exit`` in a torchrun worker
included).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import numpy as np

from probes.records import FIGURE_KINDS, Figure

_LENGTH = struct.Struct("<Q")


class DrawerStopped(RuntimeError):
    """The drawing process ended or could not be started."""


class NotSendable(TypeError):
    """Picture data the protocol does not carry (an array of objects): draw it in this process instead."""


# -- the protocol ---------------------------------------------------------------------------------------------
def _pack(value: Any, blocks: list[bytes]) -> Any:
    """``value`` as JSON, its arrays moved to ``blocks``."""
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise NotSendable(f"an array of {value.dtype} cannot be sent to the drawing process")
        blocks.append(np.ascontiguousarray(value).tobytes())
        return {"array": len(blocks) - 1, "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, (tuple, list)):
        return {"tuple": [_pack(v, blocks) for v in value]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise NotSendable(f"{type(value).__name__} cannot be sent to the drawing process")


def _unpack(value: Any, blocks: list[bytes]) -> Any:
    if isinstance(value, dict) and "array" in value:
        return np.frombuffer(blocks[value["array"]], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_unpack(v, blocks) for v in value["tuple"])
    return value


def _send(stream: IO[bytes], header: dict[str, Any], blocks: list[bytes]) -> None:
    head = json.dumps(header).encode()
    parts = [_LENGTH.pack(len(blocks)), _LENGTH.pack(len(head)), head]
    for block in blocks:
        parts += [_LENGTH.pack(len(block)), block]
    stream.write(b"".join(parts))
    stream.flush()


def _read(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return data


def _receive(stream: IO[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    (count,) = _LENGTH.unpack(_read(stream, _LENGTH.size))
    (n,) = _LENGTH.unpack(_read(stream, _LENGTH.size))
    header = json.loads(_read(stream, n))
    blocks = []
    for _ in range(count):
        (n,) = _LENGTH.unpack(_read(stream, _LENGTH.size))
        blocks.append(_read(stream, n))
    return header, blocks


def encode_figure(figure: Figure) -> tuple[dict[str, Any], list[bytes]]:
    """The message that asks for ``figure``: its kind and fields, the arrays as blocks.

    Raises:
        NotSendable: a field the protocol does not carry.
    """
    blocks: list[bytes] = []
    fields = {f.name: _pack(getattr(figure, f.name), blocks) for f in dataclasses.fields(figure)}
    return {"kind": type(figure).__name__, "fields": fields}, blocks


def decode_figure(header: dict[str, Any], blocks: list[bytes]) -> Figure:
    """The picture data of a message made by ``encode_figure``."""
    kind = FIGURE_KINDS[header["kind"]]
    return kind(**{name: _unpack(v, blocks) for name, v in header["fields"].items()})


# -- the training process's side --------------------------------------------------------------------------------
class DrawingProcess:
    """``draw(figure)`` has the drawing process draw ``figure`` (one picture at a time) and returns its pixels and
    PNG; a stopped process raises ``DrawerStopped``."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[3])
        env = dict(os.environ)  # the modules this process can import, that one can too
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([package_root, *filter(None, sys.path)]))
        env.setdefault("MPLBACKEND", "Agg")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from probes.app.render.background import main; main()"],
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
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
        """The process's input and output: the pipes ``__init__`` asked for."""
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None and stdout is not None  # both subprocess.PIPE
        return stdin, stdout

    def draw(self, figure: Figure) -> tuple[np.ndarray, bytes]:
        """The pixels of ``figure``, uint8 ``(H, W, 3)``, and their PNG, drawn there.

        Raises:
            NotSendable: data the protocol does not carry.
            DrawerStopped: the process ended.
            RuntimeError: drawing raised there (its message).
        """
        header, blocks = encode_figure(figure)
        stdin, stdout = self._pipes()
        with self._lock:
            try:
                _send(stdin, header, blocks)
                answer, out = _receive(stdout)
            except (OSError, EOFError, ValueError) as exc:
                raise DrawerStopped(f"the drawing process stopped ({exc!r})") from exc
        if "error" in answer:
            raise RuntimeError(answer["error"])
        h, w = answer["ok"]
        return np.frombuffer(out[0], dtype=np.uint8).reshape(h, w, 3).copy(), out[1]

    def shutdown(self, wait: bool = False) -> None:
        """Close its input (it then ends), and wait for it with ``wait``."""
        with self._lock:
            for stream in self._pipes():
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


_SHARED: DrawingProcess | None = None
_SHARED_LOCK = threading.Lock()


def shared() -> DrawingProcess | None:
    """The drawing process of this process (started at the first call, or again after it stopped), or None where
    it cannot start."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is not None and _SHARED.alive:
            return _SHARED
        try:
            _SHARED = DrawingProcess()
        except DrawerStopped as exc:
            import logging

            logging.getLogger("probes").warning("probes: no drawing process (%s); images are drawn in a thread", exc)
            _SHARED = None
        return _SHARED


def drop(process: DrawingProcess) -> None:
    """Forget a drawing process that stopped (the next ``shared()`` starts a new one)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is process:
            _SHARED = None
    process.shutdown()


# -- the drawing process's side ---------------------------------------------------------------------------------
def _answer(header: dict[str, Any], blocks: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    from probes.app.render.canvas import encode_png
    from probes.app.render.figure import as_uint8, draw

    try:
        pixels = as_uint8(draw(decode_figure(header, blocks)))
        png = encode_png(pixels)
    except Exception as exc:  # noqa: BLE001 - reported to the sink, which reports it once
        return {"error": f"{type(exc).__name__}: {exc}"}, []
    return {"ok": list(pixels.shape[:2])}, [np.ascontiguousarray(pixels).tobytes(), png]


def main() -> None:
    """The drawing process's loop (see the module docstring)."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a print while drawing must not mix into the answers
    try:
        from probes.app.render.canvas import new_figure, style

        with style():
            new_figure(8, 8)  # matplotlib's import and fonts, before the first image
    except Exception:  # noqa: BLE001 - the first picture will say what is wrong
        pass
    while True:
        try:
            header, blocks = _receive(stdin)
        except (EOFError, ValueError):
            return
        try:
            _send(stdout, *_answer(header, blocks))
        except OSError:
            return


if __name__ == "__main__":
    main()
