"""The ``probes`` command: ``probes list``, ``probes demo``, ``probes report``, ``probes tensorboard``."""

from __future__ import annotations

import argparse
import sys

#: ``probes list`` fits this many columns (descriptions wrap under their column)
LIST_WIDTH = 100


def _cadence(cls: type) -> str:
    """A probe's default cadence: its ``every`` in steps, or the schedule's repr (``-`` when it has none)."""
    every = getattr(cls, "every", None)
    if isinstance(every, int) and not isinstance(every, bool):
        return str(every)
    return repr(every) if every is not None else "-"


def list_lines(width: int = LIST_WIDTH) -> list[str]:
    """The lines of ``probes list``: name, default cadence (steps), where it came from, description."""
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
    for name, err in plugins.registry.failed.items():
        lines += textwrap.wrap(f"(plugin {name!r} failed to load: {err})", width, subsequent_indent="  ")
    lines.append("every: the default cadence in training steps (change it with {name: {\"every\": k}}).")
    return lines


def _cmd_list(args: argparse.Namespace) -> int:
    print("\n".join(list_lines()))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from probes.app.demo import run_demo

    return run_demo(logdir=args.logdir, epochs=args.epochs, smoke=args.smoke, progress=not args.no_progress)


def _cmd_report(args: argparse.Namespace) -> int:
    import warnings

    from probes.app.report import ReportWarning, write_report

    with warnings.catch_warnings():  # a chart not drawn: one line each (the page names it too), and exit 0
        warnings.simplefilter("always", ReportWarning)
        show = warnings.showwarning

        def one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     file: object = None, line: str | None = None) -> None:
            if issubclass(category, ReportWarning):
                print(f"probes report: warning: {message}", file=sys.stderr)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line
        path = write_report(args.logdir, args.output)
    print(f"wrote {path}")
    return 0


def _cmd_tensorboard(args: argparse.Namespace, extra: list[str]) -> int:
    import shlex
    import subprocess
    from pathlib import Path

    from probes.app.demo import tensorboard_command

    if not Path(args.logdir).exists():
        print(f"probes tensorboard: {args.logdir!r} does not exist yet; TensorBoard will show runs as they appear",
              file=sys.stderr)
    cmd = [*tensorboard_command(args.logdir), *extra]
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    print(f"running: {shlex.join(cmd)}", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probes", description="Instrument PyTorch training with probes.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the available probes and where they come from")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("demo", help="train a small ReLU MLP on the embedded digits with every built-in probe")
    p.add_argument("--logdir", default="runs/demo")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="a few seconds, for tests")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("report", help="write one self-contained HTML page from a log directory")
    p.add_argument("logdir")
    p.add_argument("-o", "--output", default=None, help="HTML file (default LOGDIR/report.html)")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("tensorboard", help="open TensorBoard on a log directory (the venv's own, keeping every image)",
                       description="Run this environment's TensorBoard on LOGDIR with --samples_per_plugin images=100 "
                                   "(so the step-0 image stays visible); other options go to tensorboard as they are, "
                                   "e.g. probes tensorboard runs --port 6007.")
    p.add_argument("logdir")
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
