"""`python -m agentproxy`."""

import sys

from agentproxy.cli import main

sys.exit(main())
