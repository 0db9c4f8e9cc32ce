"""`python -m gradclip.bench [options]` (also `python -m gradclip bench`)."""

import sys

from . import main

sys.exit(main())
