"""``python -m gpusaver``: the command line (see :mod:`gpusaver.cli`)."""

from gpusaver.cli import main

raise SystemExit(main())
