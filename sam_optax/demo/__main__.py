"""``python -m sam_optax.demo``."""

import sys

from sam_optax.demo.cli import main

sys.exit(main())
