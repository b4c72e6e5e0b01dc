"""``python -m myext``: the ``myext`` command (see myext.cli)."""

from .cli import main

raise SystemExit(main())
