"""The wall clock in milliseconds since the epoch, as the status records and results keep it."""

from __future__ import annotations

import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000
