"""Sizes for people, and progress lines for long work."""

import logging
import time

log = logging.getLogger("cdipy")

# How often to report progress of long work with nbdkit -v.
PROGRESS_INTERVAL = 2.0


def describe_size(size):
    if size < 1024:
        return f"{size} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} TiB"


class Progress:
    """Debug lines with bytes and percent, at most every PROGRESS_INTERVAL."""

    def __init__(self, what, total):
        self.what = what
        self.total = total
        self.done = 0
        self.last = time.monotonic()

    def add(self, count):
        self.done += count
        now = time.monotonic()
        if now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            log.debug(f"{self.what} {describe_size(self.done)} of "
                      f"{describe_size(self.total)} "
                      f"({100 * self.done // max(self.total, 1)}%)")
