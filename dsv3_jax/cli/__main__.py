"""``python -m dsv3_jax.cli`` = ``dsv3``."""
import sys

from . import main

sys.exit(main())
