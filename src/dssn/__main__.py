import sys

from dssn.cli import main

sys.exit(main())
