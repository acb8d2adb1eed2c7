"""``python -m npyrnn``: the same as the ``npyrnn`` command."""

import sys

from npyrnn.cli import main

sys.exit(main())
