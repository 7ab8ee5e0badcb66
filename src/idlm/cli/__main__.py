"""`python -m idlm.cli ...`: the same as `idlm ...`."""

import sys

from idlm.cli import main

sys.exit(main())
