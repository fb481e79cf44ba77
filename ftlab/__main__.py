"""`python -m ftlab ...` (what torchrun launches) is the `ftlab` command."""
import sys

from .cli import main

sys.exit(main())
