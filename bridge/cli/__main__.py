"""``python -m bridge.cli``: the ``icp-bridge`` command."""

import sys

from bridge.cli import main

sys.exit(main())
