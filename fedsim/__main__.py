"""``python -m fedsim`` is the ``fedsim`` console script."""

import sys

from fedsim.cli import main

sys.exit(main())
