"""The serving benchmark's client: one thread that drives the engine's `step()` in a loop, sends each
request when it is due (serving_workload.Admission: its arrival, and room under --max-concurrency),
notes when each token reaches it (a token arrives with the step that produced it), gives up on a
request past its timeout, and arms the failure when the work reaches the failure point.

What one run saw is a `ServedRun`: a `RequestRecord` per request (serving_metrics.py reads them), the
tokens and margins of each, when the device failed and the recovery the leader ran. Every wait is
bounded: a step is answered or the engine raises, and between arrivals the loop sleeps at most
`IDLE_S`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from fault_injection import FailurePlan
from serving_dataset import SampleRequest
from serving_metrics import RequestRecord
from serving_workload import Admission

IDLE_S = 0.05  # the longest sleep while nothing is in flight: a request due meanwhile waits at most this
ABORTED = "aborted"  # request_scheduler.Status.ABORTED's value: in flight at a failure, not recovered


@dataclass(frozen=True)
class FailurePoint:
    """Where the failure strikes: `device` fails once `after_tokens` output tokens have been served,
    or at `at_s` seconds from the start (one of the two)."""

    device: int
    after_tokens: int | None = None
    at_s: float | None = None

    def due(self, tokens_served: int, now_s: float) -> bool:
        if self.after_tokens is not None:
            return tokens_served >= self.after_tokens
        return self.at_s is not None and now_s >= self.at_s


@dataclass
class RequestState:
    """One request as the client follows it."""

    index: int
    sample: SampleRequest
    arrival_s: float
    sent_s: float | None = None
    engine_id: int | None = None
    tokens: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    logit_scales: list[float] = field(default_factory=list)  # each token's row's largest |logit|
    token_times_s: list[float] = field(default_factory=list)
    error: str | None = None
    finished_s: float | None = None

    @property
    def open(self) -> bool:
        return self.sent_s is not None and self.finished_s is None

    def record(self) -> RequestRecord:
        return RequestRecord(self.arrival_s, self.sample.prompt_len, tuple(self.token_times_s), self.sent_s,
                             self.error, self.finished_s)


@dataclass(frozen=True)
class ServedRun:
    """What one run of the workload saw, times in seconds from its start."""

    requests: list[RequestState]
    failure_s: float | None  # when the injected fault struck (None: no failure)
    recoveries: tuple[Any, ...]  # cluster_leader.Recovery, as the leader ran them
    clock_origin: float  # the run's start on time.monotonic (the engine's telemetry clock)
    recovered_s: float | None  # when the step that carried the recovery reached the client
    steps: int
    wall_s: float

    @property
    def records(self) -> list[RequestRecord]:
        return [r.record() for r in self.requests]


def serve(model: Any, samples: Sequence[SampleRequest], arrivals: Sequence[float], max_concurrency: int | None = None,
          timeout_s: float | None = None, failure: FailurePoint | None = None) -> ServedRun:
    """Run the workload once on `model` (a FaultTolerantLlama serving many requests)."""
    states = [RequestState(i, s, a) for i, (s, a) in enumerate(zip(samples, arrivals))]
    admission = Admission(list(arrivals), max_concurrency)
    by_engine_id: dict[int, RequestState] = {}
    origin = time.monotonic()
    armed, served_tokens, steps, recoveries, recovered_s = False, 0, 0, [], None

    def now() -> float:
        return time.monotonic() - origin

    while True:
        for index in admission.due(now()):
            state = states[index]
            state.sent_s = admission.sent_s[index]
            state.engine_id = model.submit(state.sample.prompt_ids, state.sample.output_len)
            by_engine_id[state.engine_id] = state
        if failure is not None and not armed and failure.due(served_tokens, now()):
            model.arm(FailurePlan(failure.device))
            armed = True
        give_up_late(model, states, admission, timeout_s, now())
        if all(s.finished_s is not None for s in states):
            break
        if not any(s.open for s in states):
            wait_for_next_arrival(admission, now())
            continue
        served = model.step()
        steps += 1
        if served.recoveries and recovered_s is None:
            recovered_s = now()
        elif not served.batch_tokens and not served.ended:
            raise RuntimeError(f"requests are in flight but nothing could be scheduled ({served.waiting} waiting)")
        recoveries += served.recoveries
        served_tokens += take_step(served, by_engine_id, admission, now())
    return ServedRun(states, failed_at(model, failure, recoveries, origin), tuple(recoveries), origin, recovered_s,
                     steps, now())


def failed_at(model: Any, failure: FailurePoint | None, recoveries: Sequence[Any], origin: float) -> float | None:
    """When the injected fault struck, in seconds from the start: its Strike, else (a notice the client
    did not hear) the failed device's last beat seen, as FaultTolerantLlama.failed_at falls back."""
    struck = [s.at for s in model.strikes if failure is not None and s.device == failure.device]
    if struck:
        return min(struck) - origin
    events = [e for r in recoveries for e in r.events if failure is not None and e.device == failure.device]
    return model.failed_at(events[0]) - origin if events else None


def take_step(served: Any, by_engine_id: dict[int, RequestState], admission: Admission, at_s: float) -> int:
    """Note a ServedStep's tokens (all arriving at `at_s`) and endings; the tokens it served."""
    for engine_id, token in served.tokens.items():
        state = by_engine_id[engine_id]
        state.tokens.append(token)
        state.margins.append(served.margins[engine_id])
        state.logit_scales.append(served.logit_scales[engine_id])
        state.token_times_s.append(at_s)
    for engine_id, why in served.ended.items():
        state = by_engine_id[engine_id]
        if state.finished_s is None:  # a request the client gave up on may end in the engine later
            state.error = "aborted at the failure" if why == ABORTED else None
            end(state, admission, at_s)
    return len(served.tokens)


def give_up_late(model: Any, states: list[RequestState], admission: Admission, timeout_s: float | None,
                 now_s: float) -> None:
    """--request-timeout-s: a client that gives up; the request is cancelled and counts as failed."""
    if timeout_s is None:
        return
    for state in states:
        if state.open and now_s - state.sent_s > timeout_s:
            model.cancel(state.engine_id)
            state.error = f"timed out after {timeout_s:g} s"
            end(state, admission, now_s)


def end(state: RequestState, admission: Admission, at_s: float) -> None:
    state.finished_s = at_s
    admission.finished(state.index)


def wait_for_next_arrival(admission: Admission, now_s: float) -> None:
    """Nothing in flight: sleep until the next request is due, at most IDLE_S at a time."""
    upcoming = admission.next_arrival()
    if upcoming is None:
        raise RuntimeError("requests are unfinished but none is in flight or still to come")
    time.sleep(min(max(upcoming - now_s, 0.0), IDLE_S))
