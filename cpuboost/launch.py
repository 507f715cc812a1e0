"""``python -m cpuboost.launch``: kept at the top so the documented command works; see cpuboost.distributed.launch."""
import sys

from .distributed.launch import main

if __name__ == "__main__":
    sys.exit(main())
