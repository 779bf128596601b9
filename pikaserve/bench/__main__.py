"""`python -m pikaserve.bench ...`: the same as `pikaserve bench ...`."""

import sys

from pikaserve.bench.cli import main

sys.exit(main())
