"""`python -m maskmill ...`: the same command line as `maskmill ...`."""
import sys

from maskmill.cli import main

sys.exit(main())
