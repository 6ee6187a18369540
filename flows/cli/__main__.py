"""``python -m flows.cli``: the ``lora-ranks`` command."""

import sys

from flows.cli import main

sys.exit(main())
