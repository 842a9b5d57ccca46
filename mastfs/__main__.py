"""``python -m mastfs`` is the ``mastfs`` command."""

from .cli import main

raise SystemExit(main())
