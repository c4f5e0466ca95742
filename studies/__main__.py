"""``python -m studies`` is the ``whybn`` command."""

import sys

from studies.cli import main

sys.exit(main())
