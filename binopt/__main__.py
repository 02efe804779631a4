"""``python -m binopt ...`` (used by ``torchrun -m binopt sparsify``) runs the ``binopt`` CLI."""

import sys

from applications.cli import main

sys.exit(main())
