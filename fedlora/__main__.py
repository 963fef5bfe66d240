"""``python -m fedlora`` = the ``fedlora`` command."""

from fedlora.cli import main

raise SystemExit(main())
