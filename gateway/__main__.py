"""`python -m gateway` does what the `ci-gateway` console script does."""

import sys

from gateway.cli import main

sys.exit(main())
