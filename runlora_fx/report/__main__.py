"""`python -m runlora_fx.report PATH`: cli.py."""

import sys

from runlora_fx.report.cli import main

sys.exit(main())
