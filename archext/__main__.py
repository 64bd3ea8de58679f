"""``python -m archext``: the same CLI as the ``archext`` console script."""
from archext.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
