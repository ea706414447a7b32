"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

The request and token counters and the latency histograms carry a ``memory`` label: the memory a
request chose (its name; "base" for the base alone; "default" for a server of one unnamed memory;
"" for a request refused before its model was known).

Counters and histograms are updated by the request handlers, which all run on the
server's event loop; the queue and batch gauges are read from the engine at scrape
time. A lock still guards every update, so a handler on another thread is safe.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

PREFIX = "memdec_fast"
OUTCOMES = ("success", "bad_request", "overloaded", "unavailable", "failed", "cancelled")
# seconds; the spread of vLLM's buckets, from a GPU decode step to a slow CPU prefill
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


class Histogram:
    """Cumulative buckets, a sum and a count."""

    def __init__(self, buckets: Sequence[float]):
        self.bounds = tuple(sorted(buckets)) + (math.inf,)
        self.counts = [0] * len(self.bounds)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.bounds):
            if v <= b:
                self.counts[i] += 1
                break
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        """Sample lines; labels: 'k="v"' pairs, comma-separated, put before `le`."""
        out, total = [], 0
        for b, c in zip(self.bounds, self.counts):
            total += c
            out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{_num(b)}"}} {total}')
        tail = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{tail} {_num(self.sum)}", f"{name}_count{tail} {self.count}"]


class _Series:
    """One memory's counters and histograms."""

    def __init__(self):
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)


class ServerMetrics:
    """The server's counters, gauges and histograms.

    Parameters
    ----------
    gauges : callable returning {"waiting": int, "running": int}, read at each scrape (the engine's state)
    memories : the ``memory`` label values listed from the start (others appear when first used)

    Example
    -------
    >>> m = ServerMetrics(lambda: {"waiting": 0, "running": 0}, memories=["base", "bio"])
    >>> m.request_done("success", prompt_tokens=5, generation_tokens=16, memory="bio")
    >>> print(m.render())
    """

    def __init__(self, gauges: Callable[[], dict[str, int]], memories: Sequence[str] = ("default",)):
        self._gauges = gauges
        self._lock = threading.Lock()
        self.series = {m: _Series() for m in memories}

    def _series(self, memory: str) -> _Series:
        series = self.series.get(memory)
        if series is None:
            series = self.series[memory] = _Series()
        return series

    def request_done(self, outcome: str, prompt_tokens: int = 0, generation_tokens: int = 0,
                     e2e_s: float | None = None, memory: str = "") -> None:
        """Count one finished (or refused, failed, cancelled) engine request and the tokens it used."""
        with self._lock:
            s = self._series(memory)
            s.requests[outcome] += 1
            s.prompt_tokens += prompt_tokens
            s.generation_tokens += generation_tokens
            if e2e_s is not None:
                s.e2e.observe(e2e_s)

    def first_token(self, seconds: float, memory: str = "") -> None:
        with self._lock:
            self._series(memory).ttft.observe(seconds)

    def between_tokens(self, seconds: float, tokens: int = 1, memory: str = "") -> None:
        """`tokens` tokens arrived together `seconds` after the previous ones: each counts seconds / tokens."""
        with self._lock:
            itl = self._series(memory).itl
            for _ in range(tokens):
                itl.observe(seconds / tokens)

    def render(self) -> str:
        """The exposition text (Content-Type: text/plain; version=0.0.4)."""
        g = self._gauges()
        p = PREFIX
        with self._lock:
            series = [(f'memory="{m}"', s) for m, s in self.series.items()]
            lines = [
                f"# HELP {p}_requests_total Completion requests (one per prompt) by outcome and memory.",
                f"# TYPE {p}_requests_total counter",
                *(f'{p}_requests_total{{outcome="{k}",{m}}} {v}' for m, s in series for k, v in s.requests.items()),
                f"# HELP {p}_prompt_tokens_total Prompt tokens of the requests the engine accepted.",
                f"# TYPE {p}_prompt_tokens_total counter",
                *(f"{p}_prompt_tokens_total{{{m}}} {s.prompt_tokens}" for m, s in series),
                f"# HELP {p}_generation_tokens_total Tokens generated.",
                f"# TYPE {p}_generation_tokens_total counter",
                *(f"{p}_generation_tokens_total{{{m}}} {s.generation_tokens}" for m, s in series),
                f"# HELP {p}_num_requests_waiting Requests in the engine's queue.",
                f"# TYPE {p}_num_requests_waiting gauge",
                f"{p}_num_requests_waiting {int(g['waiting'])}",
                f"# HELP {p}_num_requests_running Requests in the running batch.",
                f"# TYPE {p}_num_requests_running gauge",
                f"{p}_num_requests_running {int(g['running'])}",
                f"# HELP {p}_time_to_first_token_seconds From the request's arrival to its first token.",
                f"# TYPE {p}_time_to_first_token_seconds histogram",
                *(x for m, s in series for x in s.ttft.lines(f"{p}_time_to_first_token_seconds", m)),
                f"# HELP {p}_time_per_output_token_seconds Time between consecutive tokens of a request.",
                f"# TYPE {p}_time_per_output_token_seconds histogram",
                *(x for m, s in series for x in s.itl.lines(f"{p}_time_per_output_token_seconds", m)),
                f"# HELP {p}_e2e_request_latency_seconds From the request's arrival to its last token.",
                f"# TYPE {p}_e2e_request_latency_seconds histogram",
                *(x for m, s in series for x in s.e2e.lines(f"{p}_e2e_request_latency_seconds", m)),
            ]
        return "\n".join(lines) + "\n"
