"""Run a per-case function over a process pool with a progress bar on stderr.

Results stream back in order through ``imap`` so that only a few cases are in memory at once.
"""

from __future__ import annotations

import multiprocessing
import sys
import time


class Progress:
    """A dependency-free progress line: redrawn in place on a terminal, a few lines in logs."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.next_log = 0.0

    def update(self):
        self.done += 1
        fraction = self.done / max(self.total, 1)
        if self.tty:
            bar = "#" * int(30 * fraction)
            end = "\n" if self.done == self.total else ""
            sys.stderr.write(f"\r{self.desc}: [{bar:<30}] {self.done}/{self.total} "
                             f"{time.monotonic() - self.start:.1f}s{end}")
        elif fraction >= self.next_log or self.done == self.total:
            sys.stderr.write(f"{self.desc}: {self.done}/{self.total} ({time.monotonic() - self.start:.1f}s)\n")
            self.next_log = fraction + 0.25
        sys.stderr.flush()


def map_cases(fn, items: list, processes: int = 1, desc: str = "cases"):
    """Yield ``fn(item)`` for each item in order, using ``processes`` worker processes (1 = in this process)."""
    progress = Progress(len(items), desc)
    if processes <= 1 or len(items) <= 1:
        for item in items:
            result = fn(item)
            progress.update()
            yield result
        return
    with multiprocessing.get_context("spawn").Pool(min(processes, len(items))) as pool:
        for result in pool.imap(fn, items, chunksize=1):
            progress.update()
            yield result
