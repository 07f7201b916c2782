"""``python -m loraq.train``: a trainer process serving the local executor (see :mod:`.pipe`)."""

from .pipe import main

raise SystemExit(main())
