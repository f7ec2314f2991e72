"""``python -m lopt.bench --worker SPEC``: one bench configuration in this process (what
``lopt bench`` starts for each configuration)."""
import sys

from lopt.bench.runner import worker_main

sys.exit(worker_main(sys.argv[1:]))
