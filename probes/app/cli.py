"""The ``probes`` command: ``probes list``, ``probes demo``, ``probes report``, ``probes tensorboard``.

A problem the user can fix (a missing or empty log directory, an unwritable path) is one line on stderr naming
it, and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

#: ``probes list`` fits this many columns (descriptions wrap under their column)
LIST_WIDTH = 100


def _cadence(cls: type) -> str:
    """A probe's default cadence: its ``every`` in steps, or the schedule's repr (``-`` when it has none)."""
    every = getattr(cls, "every", None)
    if isinstance(every, int) and not isinstance(every, bool):
        return str(every)
    return repr(every) if every is not None else "-"


def option_lines(cls: type) -> list[str]:
    """``probes list --options``: a probe's options with their defaults (and help, where its ``Options`` dataclass
    gives one), one per line.

    Args:
        cls: a probe class.
    """
    import inspect

    from probes.options import described

    options = getattr(cls, "Options", None)
    if options is not None:
        return [f"    {n}={d!r}" + (f"  ({doc})" if doc else "") for n, d, doc in described(options)]
    params = [p for p in inspect.signature(cls).parameters.values() if p.default is not p.empty]
    return [f"    {p.name}={p.default!r}" for p in params]


def list_lines(width: int = LIST_WIDTH, options: bool = False) -> list[str]:
    """The lines of ``probes list``: name, default cadence (steps), where it came from, description (``options``:
    each probe's options below it)."""
    import textwrap

    from probes import plugins

    infos = plugins.available()
    rows = [(i.name, _cadence(i.cls), i.source, " ".join(str(i.description or "").split())) for i in infos]
    head = ("probe", "every", "from", "description")
    w = [max([len(head[k])] + [len(r[k]) for r in rows]) for k in range(3)]
    indent = w[0] + w[1] + w[2] + 6
    room = max(30, width - indent)
    lines = [f"{head[0]:<{w[0]}}  {head[1]:>{w[1]}}  {head[2]:<{w[2]}}  {head[3]}"]
    for name, every, source, text in rows:
        wrapped = textwrap.wrap(text, room) or [""]
        lines.append(f"{name:<{w[0]}}  {every:>{w[1]}}  {source:<{w[2]}}  {wrapped[0]}")
        lines += [" " * indent + more for more in wrapped[1:]]
        if options:
            lines += option_lines(next(i.cls for i in infos if i.name == name))
    for name, err in plugins.registry.failed.items():
        lines += textwrap.wrap(f"(plugin {name!r} failed to load: {err})", width, subsequent_indent="  ")
    lines.append('every: the default cadence in training steps (change it with {name: {"every": k}}).')
    return lines


def _cmd_list(args: argparse.Namespace) -> int:
    print("\n".join(list_lines(options=args.options)))
    return 0


def _problem(command: str, message: str) -> int:
    """Say a problem in one line (``probes <command>: <message>``) on stderr; the exit status 2."""
    prefix = f"probes {command}: "
    message = message[len(prefix) :] if message.startswith(prefix) else message
    print(prefix + message, file=sys.stderr)
    return 2


def _os_problem(exc: OSError) -> str:
    """An ``OSError`` in words: its reason and the path (not the errno tuple)."""
    if not exc.strerror:
        return str(exc)
    return f"{exc.strerror}: {str(exc.filename)!r}" if exc.filename else exc.strerror


def _cmd_demo(args: argparse.Namespace) -> int:
    from probes.app.demo import run_demo

    progress = not args.no_progress and sys.stdout.isatty()  # a bar of \r lines only on a terminal
    return run_demo(logdir=args.logdir, epochs=args.epochs, smoke=args.smoke, progress=progress)


def _cmd_report(args: argparse.Namespace) -> int:
    import warnings

    from probes.app.report import ReportWarning, write_report

    logdir = Path(args.logdir)
    if not logdir.exists():
        return _problem("report", f"no such directory {args.logdir!r}")
    if not logdir.is_dir():
        return _problem(
            "report",
            f"{args.logdir!r} is a file, not a log directory (give the folder that holds the runs' event files)",
        )
    with warnings.catch_warnings():  # a chart not drawn: one line each (the page names it too), and exit 0
        warnings.simplefilter("always", ReportWarning)
        show = warnings.showwarning

        def one_line(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            if issubclass(category, ReportWarning):
                print(f"probes report: warning: {message}", file=sys.stderr)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line
        try:
            path = write_report(args.logdir, args.output)
        except OSError as exc:  # an unreadable folder, an output that cannot be written
            return _problem("report", _os_problem(exc))
        except ValueError as exc:  # no event files under the folder
            return _problem("report", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    print(f"wrote {path}")
    return 0


def _cmd_tensorboard(args: argparse.Namespace, extra: list[str]) -> int:
    import shlex

    from probes.app.demo import tensorboard_command

    if not Path(args.logdir).exists():
        print(
            f"probes tensorboard: {args.logdir!r} does not exist yet; TensorBoard will show runs as they appear",
            file=sys.stderr,
        )
    cmd = [*tensorboard_command(args.logdir), *extra]
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    print(f"running: {shlex.join(cmd)}", flush=True)
    return run_forwarding_signals(cmd)


def run_forwarding_signals(cmd: list[str]) -> int:
    """Run ``cmd`` and wait for it, passing SIGTERM, SIGINT (and SIGHUP) on to it, so that stopping this process
    stops the child too and nothing is left holding its port.

    Returns:
        The child's exit status; 0 when it ended after a signal passed on (Ctrl-C); 2 when it cannot start.
    """
    import signal
    import subprocess

    try:
        proc = subprocess.Popen(cmd)
    except OSError as exc:
        return _problem("tensorboard", f"cannot run {cmd[0]!r}: {_os_problem(exc)}")
    forwarded: list[int] = []

    def forward(signum: int, frame: object) -> None:
        forwarded.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    names = ("SIGTERM", "SIGINT", "SIGHUP")
    old: dict[int, object] = {}
    try:
        for sig in [getattr(signal, n) for n in names if hasattr(signal, n)]:
            try:
                old[sig] = signal.signal(sig, forward)
            except ValueError:  # not the main thread: signals go where they go
                break
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # SIGINT before the handler was set, or on a platform without it
                forward(signal.SIGINT, None)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        if proc.poll() is None:  # this process is being torn down: do not leave the child behind
            proc.terminate()
            proc.wait()
    return 0 if forwarded else code


def build_parser() -> argparse.ArgumentParser:
    from probes import __version__
    from probes.app.demo import DEFAULT_EPOCHS, SAMPLES_PER_PLUGIN, SMOKE_EPOCHS

    parser = argparse.ArgumentParser(prog="probes", description="Instrument PyTorch training with probes.")
    parser.add_argument("--version", action="version", version=f"probes {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "list",
        help="list the available probes and where they come from",
        description="List every probe that probes.attach accepts: its name, default cadence, where "
        "it comes from (builtin or the plugin's distribution) and what it measures.",
    )
    p.add_argument("--options", action="store_true", help="show each probe's options and their defaults")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser(
        "demo",
        help="train a small ReLU MLP on the embedded digits with the built-in probes",
        description="Train a 64-64-32-10 ReLU MLP on the embedded handwritten digits with every "
        "built-in probe that applies to it, write TensorBoard events to a new run folder "
        "under LOGDIR, and print the last value of each key scalar.",
    )
    p.add_argument("--logdir", default="runs/demo", help="the parent folder of the run's folder (default runs/demo)")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs (default {DEFAULT_EPOCHS}, {SMOKE_EPOCHS} with --smoke)",
    )
    p.add_argument("--smoke", action="store_true", help="a few seconds on fewer digits, for tests")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it is off anyway when stdout is not a terminal)"
    )
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser(
        "report",
        help="write one self-contained HTML page from a log directory",
        description="Write one self-contained HTML page from the TensorBoard event files under "
        "LOGDIR: per run, the last value of every scalar, one chart per quantity, the "
        "final histograms and the first and latest image of each image tag, all inlined "
        "so the file opens anywhere. A chart that cannot be drawn is named on the page.",
    )
    p.add_argument("logdir", help="the folder that holds the runs (each a folder of event files)")
    p.add_argument("-o", "--output", default=None, help="HTML file (default LOGDIR/report.html)")
    p.set_defaults(func=_cmd_report)
    keep = SAMPLES_PER_PLUGIN.split("=")[1]
    p = sub.add_parser(
        "tensorboard",
        help=f"open TensorBoard on a log directory (the venv's own, keeping up to {keep} images per tag)",
        description=f"Run this environment's TensorBoard on LOGDIR with --samples_per_plugin "
        f"{SAMPLES_PER_PLUGIN}: TensorBoard keeps up to {keep} images per tag instead of "
        "its default 10, so with no more than that the step-0 image stays visible. Other "
        "options go to tensorboard as they are, e.g. probes tensorboard runs --port 6007. "
        "Stopping this command (Ctrl-C, SIGTERM) stops TensorBoard.",
    )
    p.add_argument("logdir", help="the folder that holds the runs")
    p.add_argument("--dry-run", action="store_true", help="print the tensorboard command instead of running it")
    p.set_defaults(func=_cmd_tensorboard, passthrough=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        return int(args.func(args, extra) or 0)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
