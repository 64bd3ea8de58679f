"""``python -m archext.bench``: the same CLI as the ``archext-bench`` console script."""
from archext.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
