"""`python -m pikaserve serve ...`: the same as the `pikaserve` command."""

import sys

from pikaserve.cli import main

sys.exit(main())
