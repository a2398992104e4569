"""python -m localcluster up|down|status."""

import sys

from .cluster import main

sys.exit(main())
