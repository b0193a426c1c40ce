"""``python -m vlmfast``: the ``vlmfast`` command (see :mod:`vlmfast.cli`)."""

from vlmfast.cli import main

raise SystemExit(main())
