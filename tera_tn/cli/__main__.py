"""``python -m tera_tn.cli``: the ``tera-tn`` command."""

from . import main

raise SystemExit(main())
