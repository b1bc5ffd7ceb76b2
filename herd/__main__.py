"""``python -m herd``: same as the ``herd`` console script."""

from __future__ import annotations

from herd.cli import main

raise SystemExit(main())
