"""``python -m sop_llm.ops.cli``: the same as the ``sop-llm`` command."""

import sys

from sop_llm.ops.cli import main

sys.exit(main())
