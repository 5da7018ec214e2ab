"""``python -m fimntk``: the ``fimntk`` command line."""

from fimntk.client.cli import main

raise SystemExit(main())
