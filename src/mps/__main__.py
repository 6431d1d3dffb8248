"""``python -m mps``."""
import sys

from .cli import main

sys.exit(main())
