"""``python -m badexpert``: the command line, where the ``badexpert`` script is not installed."""

from .cli import main

raise SystemExit(main())
