"""``python -m dmfnet ...``."""

import sys

from dmfnet.cli import main

sys.exit(main())
