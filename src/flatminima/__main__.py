"""``python -m flatminima``: the command-line interface (see :mod:`flatminima.cli`)."""

from .cli import main

raise SystemExit(main())
