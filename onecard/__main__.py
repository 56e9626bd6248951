"""`python -m onecard ...`: the same as the `onecard` command."""

import sys

from onecard.cli import main

sys.exit(main())
