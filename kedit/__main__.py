"""``python -m kedit`` (and ``torchrun … -m kedit``) runs the command line."""
import sys

from .cli import main

sys.exit(main())
