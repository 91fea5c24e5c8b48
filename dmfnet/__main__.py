"""``python -m dmfnet ...``."""

import sys

from dmfnet.cli import main

if __name__ == "__main__":  # the model process (spawn) imports this module again as __mp_main__
    sys.exit(main())
