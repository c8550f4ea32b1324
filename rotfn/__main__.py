"""``python -m rotfn COMMAND``: the same as the ``rotfn`` console script (see :mod:`rotfn.cli`)."""

import sys

try:
    from rotfn.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch imports: one line, as for a command (rotfn.cli.main)
    print("rotfn: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

if __name__ == "__main__":
    raise SystemExit(main())
