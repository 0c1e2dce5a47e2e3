"""``python -m probe_ase.cli``: the ``probe-ase`` command."""

import sys

from probe_ase.cli import main

sys.exit(main())
