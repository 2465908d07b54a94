"""When the serving benchmark's requests arrive, and when the driver may send them, as `vllm bench
serve` does: gaps drawn from a gamma distribution (Poisson at burstiness 1), and at most
`--max-concurrency` requests in flight, the others waiting in arrival order.

Torch-free and clock-free: times are seconds from the benchmark's start, and the driver says what
time it is, so the same schedule can be replayed in a test.
"""
from __future__ import annotations

import math
from collections import deque


def arrival_times(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Each request's arrival, in seconds from the start, as vLLM's get_request draws them.

    `request_rate` inf: all at 0. Otherwise each gap is gamma(shape=burstiness,
    scale=1/(request_rate*burstiness)) (mean 1/rate; burstiness 1 is exponential: a Poisson
    process; below 1 burstier, above 1 more even; inf: every gap exactly 1/rate), and, as vLLM does,
    the arrivals are then scaled so that the last one is at num_requests/request_rate, which keeps
    the offered rate the same from seed to seed. Seeded with numpy's default_rng(seed).
    """
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate {request_rate} and burstiness {burstiness} must be positive")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    if math.isinf(burstiness):
        gaps = [1.0 / request_rate] * num_requests
    else:
        import numpy as np
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests).tolist()
    times = _cumulative(gaps)
    if not times or times[-1] == 0:
        return times
    scale = num_requests / request_rate / times[-1]
    return [t * scale for t in times]


def _cumulative(gaps: list[float]) -> list[float]:
    times, total = [], 0.0
    for gap in gaps:
        total += gap
        times.append(total)
    return times


class Admission:
    """Which requests the driver may send now: those that have arrived, in arrival order, while fewer
    than `max_concurrency` are in flight (None: no limit), as vLLM's semaphore admits them.

    The driver calls `due(now)` to take the requests to send, `finished(index)` when one ends (done
    or failed), and `next_arrival()` to know how long it may wait. `sent_s[i]` is when request i
    was taken: its latencies count from there, and `sent_s[i] - arrivals[i]` is its client queue.
    """

    def __init__(self, arrivals: list[float], max_concurrency: int | None = None):
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max concurrency {max_concurrency}: must be at least 1")
        self.arrivals = arrivals
        self.max_concurrency = max_concurrency
        self.sent_s: list[float | None] = [None] * len(arrivals)
        self.in_flight: set[int] = set()
        self._waiting = deque(sorted(range(len(arrivals)), key=lambda i: arrivals[i]))

    def due(self, now: float) -> list[int]:
        """The requests to send at `now` (marked in flight)."""
        taken = []
        while self._waiting and self.arrivals[self._waiting[0]] <= now and self._has_room():
            index = self._waiting.popleft()
            self.sent_s[index] = now
            self.in_flight.add(index)
            taken.append(index)
        return taken

    def finished(self, index: int) -> None:
        """Request `index` has ended (completed or failed): its place is free."""
        self.in_flight.remove(index)

    def next_arrival(self) -> float | None:
        """When the next unsent request arrives (maybe already past, if it waits for room); None if all are sent."""
        return self.arrivals[self._waiting[0]] if self._waiting else None

    def _has_room(self) -> bool:
        return self.max_concurrency is None or len(self.in_flight) < self.max_concurrency
