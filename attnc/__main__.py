"""`python -m attnc ...`: the same as the `attnc` command."""

import sys

from attnc.cli import main

sys.exit(main())
