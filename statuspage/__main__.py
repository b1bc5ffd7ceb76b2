"""``python -m statuspage``."""

import sys

from statuspage.cli import main

sys.exit(main())
