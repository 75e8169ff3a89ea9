"""``python -m knapspec.cli``: the command line."""

from . import main

raise SystemExit(main())
