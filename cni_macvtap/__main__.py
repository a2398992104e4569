"""`python -m cni_macvtap` runs the plugin executable."""

import sys

from .cli import main

sys.exit(main())
