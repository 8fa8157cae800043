"""``python -m headgain``: the same as the ``headgain`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
