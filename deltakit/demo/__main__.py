"""``python -m deltakit.demo``: the same as ``deltakit demo``."""

from .run import main

raise SystemExit(main())
