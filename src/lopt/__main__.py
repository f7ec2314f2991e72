"""``python -m lopt`` (and ``torchrun -m lopt``) runs the command line."""
import sys

from lopt.cli import main

sys.exit(main())
