"""The ``rotfn`` command: ``rotfn demo`` (also ``python -m rotfn demo``).

Each subcommand's parser sets ``func``, which takes the parsed arguments and
returns the exit code: 0 ok, 1 the command failed (e.g. a missing optional
dependency), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rotfn import demo

__all__ = ["build_parser", "main", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_EPILOG = """examples:
  rotfn demo              W4A4 plans on all-MiniLM-L6-v2 (offline), QuaRot equivalence, Hadamard and format tables
  rotfn demo --rows 64    the same on fewer activation rows (faster)
  python -m rotfn demo    the same without the console script
"""


def _run_demo(args: argparse.Namespace) -> int:
    try:
        return demo.run(seed=args.seed, rows=args.rows)
    except ModuleNotFoundError as err:
        if err.name != "hypothesis":
            raise
        print("rotfn demo: needs hypothesis (for rotfn.testing); fix: pip install 'rotfn[test]'", file=sys.stderr)
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``rotfn`` command, one subparser per subcommand.

    Returns:
        An ``argparse.ArgumentParser``; a parsed namespace has ``command`` and ``func(args) -> int``.

    Example:
        >>> build_parser().parse_args(["demo", "--seed", "3"]).seed
        3
    """
    parser = argparse.ArgumentParser(
        prog="rotfn",
        description="rotfn: rotations (Hadamard, ...) and quantizers (MXFP4, NVFP4, INT, FP8) for PyTorch models.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo",
        help="print rotfn's main job on an embedded real model and built-in data (seconds on a CPU)",
        description=demo.__doc__.splitlines()[0],
        epilog="example:\n  rotfn demo --seed 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser).set_defaults(func=_run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rotfn`` command.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        The exit code: 0 on success (and for ``--help``), 1 when the command failed,
        2 on a usage error (no or unknown command, unknown option, bad value; message on stderr).

    Example:
        >>> main(["no-such-command"])
        2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse exits on --help (0) and on usage errors (2)
        return EXIT_OK if stop.code is None else int(stop.code)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("rotfn: error: a command is required (e.g. rotfn demo)", file=sys.stderr)
        return EXIT_USAGE
    return args.func(args)
