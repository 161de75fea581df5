"""``python -m sop_llm.ops.openapi [PATH]``: write the OpenAPI document to PATH, or to stdout."""

import sys

from sop_llm.ops.openapi import main

sys.exit(main(sys.argv[1:]))
