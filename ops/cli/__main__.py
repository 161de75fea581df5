"""``python -m ops.cli``: the same as the ``sop-llm`` command."""

import sys

from ops.cli import main

sys.exit(main())
