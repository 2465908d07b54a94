"""The serving benchmark's numbers, from what happened to each request: vLLM's `vllm bench serve`
metrics under vLLM's field names and definitions (numpy's mean, median, population std and
linearly interpolated percentiles), and the tool's own two about a failure: the longest stall
between two tokens of a request, and how long until the output rate is back.

Torch-free. Every time is in seconds from the benchmark's start; the result is strict JSON (a
statistic of no values is None, where vLLM would write 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILE_METRICS = ("ttft", "tpot", "itl")  # vLLM's default for a generative model
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
RECOVERY_WINDOW_S = 2.0
RECOVERY_FRACTION = 0.9
RECOVERY_STEP_S = 0.01


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request, as the driver saw it.

    `arrival_s`: when the workload released it; `sent_s`: when the driver handed it to the engine
    (later under --max-concurrency; None: at arrival); `token_times_s`: when each output token
    reached the driver; `error`: why it failed (None: it completed); `finished_s`: when it ended
    (None: at its last token, or when it was sent if it has none).
    """

    arrival_s: float
    prompt_len: int
    token_times_s: tuple[float, ...]
    sent_s: float | None = None
    error: str | None = None
    finished_s: float | None = None

    def __post_init__(self) -> None:
        if self.error is None and not self.token_times_s:
            raise ValueError("a completed request has at least one output token")

    @property
    def success(self) -> bool:
        return self.error is None

    @property
    def output_len(self) -> int:
        return len(self.token_times_s)

    @property
    def start_s(self) -> float:
        """Where its latencies count from: when it was sent (vLLM's start_time)."""
        return self.arrival_s if self.sent_s is None else self.sent_s

    @property
    def end_s(self) -> float:
        if self.finished_s is not None:
            return self.finished_s
        return self.token_times_s[-1] if self.token_times_s else self.start_s

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0] - self.start_s

    @property
    def e2el_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def itls_s(self) -> list[float]:
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:])]

    @property
    def tpot_s(self) -> float | None:
        """vLLM's TPOT: the time after the first token over the tokens after it; None for one token."""
        return (self.e2el_s - self.ttft_s) / (self.output_len - 1) if self.output_len > 1 else None


def serving_metrics(records: Sequence[RequestRecord], percentiles: Sequence[float] = (99.0,),
                    percentile_metrics: Sequence[str] = DEFAULT_PERCENTILE_METRICS,
                    goodput: dict[str, float] | None = None, failure_s: float | None = None) -> dict[str, Any]:
    """vLLM's result fields for these requests, then the tool's own.

    Failed requests count in `failed` and in `duration` only: tokens, throughputs and latency
    statistics stand on the completed ones, as in vLLM. `duration` runs from 0 to the end of the
    last request. `goodput` maps ttft/tpot/e2el to an SLO in ms (None: no `request_goodput`).
    For each of `percentile_metrics`: mean, median, std and each percentile, in ms, and
    `<metric>_requests`, the number of requests they stand on (`itl_gaps` too: ITL's values are
    gaps). `failure_s`: when a device failed, for `throughput_recovery_s`.
    """
    done = [r for r in records if r.success]
    duration = max((r.end_s for r in records), default=0.0)
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_len for r in done)
    result: dict[str, Any] = {
        "duration": duration, "completed": len(done), "failed": len(records) - len(done),
        "total_input_tokens": total_input, "total_output_tokens": total_output,
        "request_throughput": _per_second(len(done), duration),
        "request_goodput": _per_second(good_requests(done, goodput), duration) if goodput else None,
        "output_throughput": _per_second(total_output, duration),
        "total_token_throughput": _per_second(total_input + total_output, duration),
        "errors": [r.error for r in records],
    }
    for metric in percentile_metrics:
        result.update(latency_stats(metric, _values(metric, done), percentiles))
        result[f"{metric}_requests"] = _request_count(metric, done)
    if "itl" in percentile_metrics:
        result["itl_gaps"] = sum(r.output_len - 1 for r in done)
    result.update(stall_fields(records))
    result["failure_s"] = failure_s
    result["throughput_recovery_s"] = None if failure_s is None else throughput_recovery_s(records, failure_s)
    return result


def _per_second(count: int, duration: float) -> float | None:
    return count / duration if duration > 0 else None


def _values(metric: str, done: Sequence[RequestRecord]) -> list[float]:
    """The metric's samples in seconds: one per request, but ITL's every gap, and TPOT's only
    requests of more than one token."""
    if metric == "itl":
        return [gap for r in done for gap in r.itls_s]
    if metric == "tpot":
        return [r.tpot_s for r in done if r.tpot_s is not None]
    return [getattr(r, f"{metric}_s") for r in done]


def _request_count(metric: str, done: Sequence[RequestRecord]) -> int:
    minimum = 2 if metric in ("tpot", "itl") else 1
    return sum(1 for r in done if r.output_len >= minimum)


def percentile_key(metric: str, p: float) -> str:
    """vLLM's field name: p99_ttft_ms, p99.9_ttft_ms."""
    word = str(int(p)) if int(p) == p else str(p)
    return f"p{word}_{metric}_ms"


def latency_stats(metric: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float | None]:
    """mean/median/std/p{P} of `values_s` in ms, computed as vLLM computes them; None for no values."""
    stats: dict[str, float | None] = {f"{name}_{metric}_ms": None for name in ("mean", "median", "std")}
    stats.update({percentile_key(metric, p): None for p in percentiles})
    if not values_s:
        return stats
    ms = np.asarray(values_s, dtype=float) * 1000
    stats.update({f"mean_{metric}_ms": float(np.mean(ms)), f"median_{metric}_ms": float(np.median(ms)),
                  f"std_{metric}_ms": float(np.std(ms))})
    stats.update({percentile_key(metric, p): float(np.percentile(ms, p)) for p in percentiles})
    return stats


def good_requests(done: Iterable[RequestRecord], slos_ms: dict[str, float]) -> int:
    """Completed requests within every given SLO (as vLLM: a one-token request's TPOT counts as 0)."""
    def within(r: RequestRecord) -> bool:
        values = {"ttft": r.ttft_s, "tpot": r.tpot_s or 0.0, "e2el": r.e2el_s}
        return all(values[name] <= slo / 1000 for name, slo in slos_ms.items())
    return sum(1 for r in done if within(r))


def stall_fields(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """The longest gap between consecutive tokens of each completed request (None: fewer than two
    tokens, or failed) and the longest of all, in ms."""
    per_request = [max(r.itls_s) * 1000 if r.success and r.output_len > 1 else None for r in records]
    stalls = [s for s in per_request if s is not None]
    return {"longest_stall_ms": max(stalls, default=None), "longest_stall_ms_per_request": per_request}


def steady_end_s(records: Sequence[RequestRecord]) -> float | None:
    """When the run starts to drain: the first end of a completed request after the last request was
    sent. From then on the batch only shrinks, so the output rate falls whatever the engine does."""
    last_sent = max((r.start_s for r in records), default=None)
    ends = [r.end_s for r in records if r.success and last_sent is not None and r.end_s >= last_sent]
    return min(ends, default=None)


def throughput_recovery_s(records: Sequence[RequestRecord], failure_s: float, window_s: float = RECOVERY_WINDOW_S,
                          fraction: float = RECOVERY_FRACTION, step_s: float = RECOVERY_STEP_S) -> float | None:
    """Seconds from the failure at `failure_s` until the output rate is back; None if it never is.

    On the survivors (the completed requests' tokens), up to D = `steady_end_s` (the drain after the
    last request was sent is not held against the engine): back at the first moment t >= failure_s,
    on a grid of `step_s`, such that the rate in every window [s, s + window_s) with t <= s and
    s + window_s <= D is at least `fraction` of "its rate later in the run", the mean rate from t
    to D: tokens in [t, D] / (D - t), which must be above 0. None when no such t exists: the failure
    is within a window of D, or the survivors produce no token after it.
    """
    end = steady_end_s(records)
    if end is None or failure_s + window_s > end:
        return None
    tokens = np.sort(np.array([t for r in records if r.success for t in r.token_times_s], dtype=float))
    starts = failure_s + step_s * np.arange(math.floor((end - window_s - failure_s) / step_s + 1e-9) + 1)
    in_window = np.searchsorted(tokens, starts + window_s, "left") - np.searchsorted(tokens, starts, "left")
    later = (np.searchsorted(tokens, end, "right") - np.searchsorted(tokens, starts, "left")) / (end - starts)
    worst_ahead = np.minimum.accumulate((in_window / window_s)[::-1])[::-1]
    back = np.flatnonzero((worst_ahead >= fraction * later) & (later > 0))
    return round(float(starts[back[0]] - failure_s), 9) if back.size else None
