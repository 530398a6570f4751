"""`python -m core.bench`: see core/bench/__init__.py."""

import sys

from core.bench import main
from core.errors import DistillError

if __name__ == "__main__":
    try:
        main()
    except DistillError as exc:  # a bad flag: one clear line, exit status 2 (as every run script)
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
