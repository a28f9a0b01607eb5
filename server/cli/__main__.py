"""`python -m server.cli`: the same as the `flux2-server` command."""

import sys

from server.cli import main

sys.exit(main())
