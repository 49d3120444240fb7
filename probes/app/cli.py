"""The ``probes`` command: ``probes list``, ``probes demo``, ``probes report``."""

from __future__ import annotations

import argparse
import sys


def _cmd_list(args: argparse.Namespace) -> int:
    from probes import plugins

    infos = plugins.available()
    width = max((len(i.name) for i in infos), default=4)
    swidth = max((len(i.source) for i in infos), default=6)
    print(f"{'probe':<{width}}  {'from':<{swidth}}  description")
    for info in infos:
        print(f"{info.name:<{width}}  {info.source:<{swidth}}  {info.description}")
    for name, err in plugins.registry.failed.items():
        print(f"(plugin {name!r} failed to load: {err})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from probes.app.demo import run_demo

    return run_demo(logdir=args.logdir, epochs=args.epochs, smoke=args.smoke, progress=not args.no_progress)


def _cmd_report(args: argparse.Namespace) -> int:
    from probes.app.report import write_report

    path = write_report(args.logdir, args.output)
    print(f"wrote {path}")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
