"""``python -m greenprop``: the same as the ``greenprop`` command."""

from greenprop.cli import main

raise SystemExit(main())
