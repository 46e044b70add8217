"""``python -m tests.faults``: see :mod:`tests.faults`."""

import sys

from .runner import main

sys.exit(main())
