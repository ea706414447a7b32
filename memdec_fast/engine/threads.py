"""How many CPU threads the engine's steps use while other processes share the host's cores.

A CPU step splits each GEMM over the OpenMP threads and waits for the slowest. When another process
takes one of the cores, the thread on that core runs at a fraction of its speed and the whole step
waits for it: measured on a 2-core machine with one core kept busy, a gpt2-small pair's decode step
on the main thread took 89 ms at 1 row and 508 ms at 32 rows on 2 threads, against 68 and 295 ms on
1 thread (benchmarks/NOTES.md, "Engine speed"). JointGenerator's decode loop, which runs on its
caller's thread, uses it; the engine's loop thread did not fall off that cliff when measured.
:class:`ThreadGovernor` measures, every ``interval`` seconds, how many cores the rest of the host keeps
busy (from /proc/stat, less this process's own CPU time) and runs the steps on the cores left, never
more than the thread count the loop started with.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def host_busy_seconds() -> float | None:
    """CPU seconds all processes have run on this host since boot (/proc/stat), or None where it is unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ThreadGovernor:
    """Sets the calling thread's torch thread count to the cores that other processes leave free, until
    :meth:`restore`.

    Parameters
    ----------
    interval : float, seconds between two looks at the host
    cores : int, the host's cores (default os.cpu_count())
    host_seconds, own_seconds, clock : the readings (injectable for tests): the host's busy CPU seconds, this
        process's CPU seconds, and the wall clock

    Example
    -------
    >>> governor = ThreadGovernor()
    >>> governor.update()  # between two steps, on the thread that runs them
    >>> governor.restore()  # the thread count it started with
    """

    SMOOTHING = 0.3

    def __init__(self, interval: float = 0.5, cores: int | None = None,
                 host_seconds: Callable[[], float | None] = host_busy_seconds,
                 own_seconds: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.monotonic):
        self.interval, self.host_seconds, self.own_seconds, self.clock = interval, host_seconds, own_seconds, clock
        self.cores = cores or os.cpu_count() or 1
        self.max_threads = torch.get_num_threads()
        self.threads = self.max_threads
        self.others: float | None = None  # cores kept busy by other processes (moving average)
        self._last = self._reading()

    def _reading(self) -> tuple[float, float | None, float]:
        return self.clock(), self.host_seconds(), self.own_seconds()

    def update(self) -> int:
        """Look at the host when ``interval`` has passed since the last look; returns the thread count in use."""
        if self.max_threads == 1 or self._last[1] is None or self.clock() - self._last[0] < self.interval:
            return self.threads
        now = self._reading()
        (t0, host0, own0), (t1, host1, own1) = self._last, now
        self._last = now
        if host1 is None:
            return self.threads
        others = max(0.0, (host1 - host0) - (own1 - own0)) / (t1 - t0)
        self.others = others if self.others is None else self.others + self.SMOOTHING * (others - self.others)
        threads = max(1, min(self.max_threads, round(self.cores - self.others)))
        if threads != self.threads:
            logger.info("memdec_fast engine: other processes keep %.1f cores busy: steps run on %d threads (of %d)",
                        self.others, threads, self.max_threads)
            torch.set_num_threads(threads)
            self.threads = threads
        return self.threads

    def restore(self) -> None:
        """Give the calling thread back the thread count it had when the governor was made."""
        if self.threads != self.max_threads:
            torch.set_num_threads(self.max_threads)
            self.threads = self.max_threads
