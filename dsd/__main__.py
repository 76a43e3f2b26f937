"""``python -m dsd``: the ``dsd`` command."""
import sys

from .cli.main import main

sys.exit(main())
