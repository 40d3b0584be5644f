"""``python -m scalple``: the same as the ``scalple`` command."""

import sys

from scalple.cli import main

sys.exit(main())
