"""``python -m cpuboost env|bench|launch``: the same as the ``cpuboost`` console script."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
