import sys

from probes.app.cli import main

sys.exit(main())
