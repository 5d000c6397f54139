"""`northstar` command line: a thin layer over each stage's `run(cfg)`.

Each area registers its own subcommands (`register(subparsers)` in its
`cli.py`), so this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading

# Modules that add subcommands. Imported lazily so `northstar --help` is fast
# and a broken optional area cannot take the whole CLI down.
COMMAND_MODULES = (
    "training.cli",
    "serving.cli",
    "serving.online_cli",
    "feedback.cli",
    "fairness.cli",
    "simulator.cli",
    "loadtest.cli",
    "canary.cli",
    "diagnose.cli",
    # after simulator.cli: the studies add their subcommands to `simulate`
    "studies.cli",
    "northstar.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="northstar", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # the area does not exist yet
                continue
            raise
        module.register(sub)
    return parser


def _exit_on_sigterm(signum, _frame) -> None:
    # `kill PID` (and Kubernetes stopping a pod) sends SIGTERM, whose default action ends the
    # process at once: no `finally`, so a tritonserver we started would outlive us. Turn it
    # into an exception that unwinds the stack and runs them.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:
        # Input errors: one clear line, no traceback; the message names what was wrong.
        print(f"northstar {args.command}: error: {exc}", file=sys.stderr)
        return 2
