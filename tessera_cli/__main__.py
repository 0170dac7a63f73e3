"""``python -m tessera_cli``: the same as the ``tessera`` console script."""

from tessera_cli.main import main

raise SystemExit(main())
