"""The ``rotfn`` command's edge with its process: is this process the command, and Ctrl-C while rotfn loads.

``import rotfn`` loads torch (seconds). The console script (``from rotfn.cli import main``) and
``python -m rotfn`` (runpy imports the package before ``rotfn/__main__.py`` runs) both import it
before any code of :mod:`rotfn.cli` can catch a Ctrl-C, so the package's own imports run under
:func:`interrupt_exits`: for the command, one line and exit 130, as for an interrupted command; for
everyone else (a program or a notebook importing rotfn) the ``KeyboardInterrupt`` goes on unchanged.

Only the standard library is imported here: this runs before torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

__all__ = ["EXIT_INTERRUPTED", "interrupt_exits", "is_command"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
_SCRIPT = re.compile(r"rotfn(-script\.pyw?|\.exe)?")  # the console script, as pip writes it on each platform
_WITH_VALUE = ("-W", "-X", "--check-hash-based-pycs")  # interpreter options whose value is the next argument


def is_command(argv: list[str] | None = None, orig_argv: list[str] | None = None) -> bool:
    """True when this process is the ``rotfn`` command: its console script, or ``python -m rotfn``.

    The console script's path is ``sys.argv[0]``; ``python -m rotfn`` shows as ``-m rotfn`` among the
    interpreter's own options in ``sys.orig_argv`` (before a script, ``-c`` or ``-m``, which end them).

    Args:
        argv, orig_argv: ``sys.argv`` and ``sys.orig_argv`` (None: the process's own).

    Example:
        >>> is_command(["/venv/bin/rotfn", "fold"], ["/venv/bin/python", "/venv/bin/rotfn", "fold"])
        True
        >>> is_command(["/src/rotfn/__main__.py", "fold"], ["python", "-X", "utf8", "-m", "rotfn", "fold"])
        True
        >>> is_command(["train.py", "-m", "rotfn"], ["python", "train.py", "-m", "rotfn"])
        False
        >>> is_command(["-c"], ["python", "-c", "import rotfn"]), is_command(["-m"], ["python", "-m", "rotfn.cli"])
        (False, False)
    """
    argv = sys.argv if argv is None else argv
    orig_argv = sys.orig_argv if orig_argv is None else orig_argv
    if argv and _SCRIPT.fullmatch(os.path.basename(argv[0])):
        return True
    options = iter(orig_argv[1:])
    for option in options:
        if option in _WITH_VALUE:
            next(options, None)
        elif option == "-m":
            return next(options, None) == "rotfn"
        elif option.startswith("-m"):
            return option == "-mrotfn"
        elif option == "-" or option.startswith("-c") or not option.startswith("-"):
            return False  # stdin, -c CODE or a script
    return False


@contextlib.contextmanager
def interrupt_exits(command: bool | None = None):
    """Run a block (rotfn's imports) so that, in the ``rotfn`` command, Ctrl-C prints ``rotfn: interrupted`` and exits
    130 without a traceback; elsewhere the ``KeyboardInterrupt`` propagates as it came.

    Args:
        command: whether this process is the command (None: :func:`is_command`).

    Raises:
        SystemExit: code 130, in the command only.

    Example:
        >>> with interrupt_exits():
        ...     import json
    """
    try:
        yield
    except KeyboardInterrupt:
        if not (is_command() if command is None else command):
            raise
        print("rotfn: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
