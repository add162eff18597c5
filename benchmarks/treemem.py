"""Peak memory of the current process and its descendants, per phase, from a background thread (standard library
only, so that the drivers in both venvs can use it).

The drivers mark phases (``monitor.phase("timed")``); the peak summed PSS/RSS of the process tree is kept per phase.
This separates the memory of the timed training iterations from set-up and from the extra per-part iterations,
which the outside measurement of the whole subprocess cannot.
"""

from __future__ import annotations

import os
import threading
import time

from bench_fingerprint import POLL_S, _rss_pss, _tree


class TreeMemoryMonitor:
    def __init__(self, interval: float = POLL_S):
        self.interval = interval
        self.peaks: dict[str, dict[str, float]] = {}
        self._phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        rss = pss = 0
        for pid in _tree(os.getpid()):
            r, s = _rss_pss(pid)
            rss += r
            pss += s
        peak = self.peaks.setdefault(self._phase, {"peak_pss_mb": 0.0, "peak_rss_mb": 0.0})
        peak["peak_pss_mb"] = max(peak["peak_pss_mb"], pss / 2 ** 20)
        peak["peak_rss_mb"] = max(peak["peak_rss_mb"], rss / 2 ** 20)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def phase(self, name: str) -> None:
        self._sample()
        self._phase = name

    def stop(self) -> dict:
        self._sample()
        self._stop.set()
        self._thread.join(timeout=5)
        return {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in self.peaks.items()}
