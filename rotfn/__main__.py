"""``python -m rotfn COMMAND``: the same as the ``rotfn`` console script (see :mod:`rotfn.cli`)."""

from rotfn._command import interrupt_exits

with interrupt_exits(command=__name__ == "__main__"):  # Ctrl-C while the command loads: one line, exit 130
    from rotfn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
