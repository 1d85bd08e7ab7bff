"""``python -m fastws.bench SCENARIO [options]``: the same as ``fastws bench``."""

import sys

from . import main

# The guard matters: generator processes are started with spawn, which imports __main__.
if __name__ == "__main__":
    sys.exit(main())
