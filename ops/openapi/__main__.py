"""``python -m ops.openapi [PATH]``: write the OpenAPI document to PATH, or to stdout."""

import sys

from ops.openapi import main

sys.exit(main(sys.argv[1:]))
