"""Log lines a stranger can cause are folded, so a flood of bad requests cannot flood the server's log.

python-multipart logs a warning for every malformed part header (a stranger decides how many); the
client already gets a 400 with the reason, so the server keeps the first line and then at most one per
minute, saying how many it folded in between.
"""

from __future__ import annotations

import logging
import math
import time

MULTIPART_LOGGERS = ("python_multipart.multipart", "multipart.multipart")  # new and old package names


class FoldRepeats(logging.Filter):
    """Lets a record through at most once per ``interval`` seconds; the next one says how many were folded."""

    def __init__(self, interval: float = 60.0):
        super().__init__()
        self.interval = interval
        self.last = -math.inf
        self.folded = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.folded += 1
            return False
        if self.folded:
            record.msg, record.args = f"{record.getMessage()} (and {self.folded} more since the last one)", ()
        self.last, self.folded = now, 0
        return True


def fold_request_warnings(interval: float = 60.0) -> None:
    """Fold the warnings that malformed uploads make (one filter per logger, added once)."""
    for name in MULTIPART_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, FoldRepeats) for f in logger.filters):
            logger.addFilter(FoldRepeats(interval))
