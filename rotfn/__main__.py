"""``python -m rotfn COMMAND``: the same as the ``rotfn`` console script (see :mod:`rotfn.cli`)."""

from rotfn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
