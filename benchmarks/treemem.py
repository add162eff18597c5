"""Memory of a process tree from /proc (standard library only, so that the drivers in both venvs can use it).

* ``tree`` / ``rss_pss`` / ``tree_rss_pss``: the polling primitives. ``tree_rss_pss(pid)`` sums the resident set
  sizes (RSS) and the proportional set sizes (PSS, shared pages split between processes, from
  /proc/PID/smaps_rollup) of a process and all its descendants. ``benchutil.run_measured`` polls them every
  ``POLL_S`` seconds for a subprocess (all the benchmarks measure their subprocesses this way).
* ``cuda_peak_mb``: the peak GPU memory of torch's allocator in this process (torch imported only when asked).
* ``TreeMemoryMonitor``: the peak of those sums for the current process's tree, per phase, from a background thread.
  The drivers mark phases (``monitor.phase("timed")``); the peak summed PSS/RSS of the process tree is kept per phase.
  This separates the memory of the timed training iterations from set-up and from the extra per-part iterations,
  which the outside measurement of the whole subprocess cannot.
"""

from __future__ import annotations

import os
import threading
import time

POLL_S = 0.05  # seconds between two samples of a process tree's memory

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _ppid_map() -> dict[int, int]:
    """pid -> parent pid for every process visible in /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                s = f.read()
            # comm may contain spaces/parentheses: the fields after the last ')' are safe to split
            rest = s[s.rindex(b")") + 2:].split()
            out[int(d)] = int(rest[1])
        except (OSError, ValueError, IndexError):
            pass
    return out


def tree(root: int) -> list[int]:
    """root and all its descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    todo, seen = [root], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children.get(p, []))
    return seen


def rss_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process; zeros when it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0, 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pss = rss
    return rss, pss


def tree_rss_pss(root: int) -> tuple[int, int, int]:
    """(summed RSS, summed PSS, number of processes) of root and all its descendants; bytes."""
    pids = tree(root)
    rss = pss = 0
    for pid in pids:
        r, s = rss_pss(pid)
        rss += r
        pss += s
    return rss, pss, len(pids)


class TreeMemoryMonitor:
    def __init__(self, interval: float = POLL_S):
        self.interval = interval
        self.peaks: dict[str, dict[str, float]] = {}
        self._phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        rss, pss, _ = tree_rss_pss(os.getpid())
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


def cuda_peak_mb(device) -> dict:
    """Peak GPU memory (MB) held by torch's allocator in this process on ``device``; empty for a CPU device."""
    if getattr(device, "type", None) != "cuda":
        return {}
    import torch

    return {"cuda_peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "cuda_peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}
