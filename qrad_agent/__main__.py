import sys

from qrad_agent.cli import main

sys.exit(main())
