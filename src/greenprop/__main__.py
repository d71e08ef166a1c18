"""``python -m greenprop``: the same command line as ``greenprop``."""

import sys

from greenprop.cli import main

sys.exit(main())
