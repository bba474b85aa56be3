"""`python -m agentproxy` and the `agentproxy` command: SIGHUPs are remembered before the
heavy imports (see `agentproxy.startup`)."""

import sys

from agentproxy import startup


def main() -> int:
    startup.remember_hups()
    from agentproxy.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
