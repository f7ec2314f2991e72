"""``python -m lopt`` (and ``torchrun -m lopt``) runs the command line."""
import sys

from .cli import main

sys.exit(main())
