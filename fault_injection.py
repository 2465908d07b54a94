"""Faults injected into a device and struck by the device itself, at a chosen point of its work.

A fault is armed by a command (`device_protocol.Arm`) and strikes at the device's n-th collective
call of a step, so that the others are caught mid-step, or when it starts its share of a
recovery. "crash": the device's threads end and its memory is gone. "hang": the device stops
(no compute, no beats, no messages handled) until it is released from outside, as a stopped
process is continued; then it goes on with its stale step, which the fencing must refuse.
"slow": its compute stalls for a while, its heartbeats go on (it must not be declared dead).
"wedge": its compute thread blocks and never returns, while its process, its control thread and
its beats live on (a driver stuck in a kernel, a deadlocked library): only the lack of progress
the beats report reveals it. With `signals` (the processes backend) crash and hang are real: a
crash is the process's own SIGKILL, a hang its own SIGSTOP (continued by SIGCONT from the
launcher); a wedge is a really blocked thread there too, no signal. A thread cannot be killed:
a wedged one is released when its device stops (fenced, or the cluster closing).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

FAILURE_MODES = ("crash", "hang", "slow", "wedge")


@dataclass(frozen=True)
class FailurePlan:
    """Inject a fault: `device` fails after `after_tokens` generated tokens (0: during the prefill).

    It strikes at the device's `at_call`-th collective call of that step (by default the call
    numbered like the layers: half-way through a decode step, a quarter of the way through a
    sequence-parallel prefill, which makes four calls per layer). With `during_recovery`, it
    strikes when the device is next asked to help with a recovery instead. `delay_s`: how long a
    slow device stalls.
    """

    device: int
    after_tokens: int = 0
    at_call: int | None = None
    mode: str = "crash"
    delay_s: float = 0.0
    during_recovery: bool = False

    def __post_init__(self) -> None:
        if self.mode not in FAILURE_MODES:
            raise ValueError(f"unknown failure mode {self.mode!r} (choose from {', '.join(FAILURE_MODES)})")


class DeviceCrashed(Exception):
    """Raised inside the device's own thread when an injected crash strikes: the device ends."""


class FaultSwitch:
    """A device's fault point. The device calls `at_collective_call` at every collective call and
    `at_recovery_work` when it starts recovery work; an armed plan strikes there.

    `strike` is told when a fault fires (device, mode, clock time, real signal or None); `hung` is set
    while the device is hung, so that its other threads stop too; `released` is set from outside to
    continue it. With `signals`, crash and hang are the process's own SIGKILL and SIGSTOP.
    """

    def __init__(self, device: int, default_call: int, strike: Callable[[int, str, float, str | None], None],
                 released: threading.Event, clock: Callable[[], float] = time.monotonic, signals: bool = False):
        self.device, self.default_call, self.signals = device, default_call, signals
        self.hung = threading.Event()
        self._strike_told, self._released, self._clock = strike, released, clock
        self._plan: FailurePlan | None = None
        self._calls = 0
        self._closing = threading.Event()

    def arm(self, plan: FailurePlan) -> None:
        self._plan, self._calls = plan, 0

    def new_step(self) -> None:
        """A step begins: its collective calls are counted from here."""
        self._calls = 0

    def at_collective_call(self) -> None:
        plan = self._plan
        if plan is None or plan.during_recovery:
            return
        self._calls += 1
        if self._calls >= (plan.at_call or self.default_call):
            self._fire(plan)

    def at_recovery_work(self) -> None:
        plan = self._plan
        if plan is not None and plan.during_recovery:
            self._fire(plan)

    def close(self) -> None:
        """The device is stopping: a stall, a hang or a wedge in progress ends now."""
        self._closing.set()

    def _fire(self, plan: FailurePlan) -> None:
        self._plan = None
        real = {"crash": signal.SIGKILL, "hang": signal.SIGSTOP}.get(plan.mode) if self.signals else None
        self._strike_told(self.device, plan.mode, self._clock(), None if real is None else real.name)
        if plan.mode == "slow":
            self._closing.wait(plan.delay_s)
        elif plan.mode == "wedge":
            self._closing.wait()  # the fault itself: blocked until the device stops, whatever else runs
        elif real is not None:
            os.kill(os.getpid(), real)  # the kernel does the rest; a stopped process goes on when continued
        elif plan.mode == "hang":
            self.hung.set()
            while not (self._released.is_set() or self._closing.is_set()):
                self._released.wait(0.05)
            self.hung.clear()
        else:
            raise DeviceCrashed(f"Device-{self.device} crashed (injected)")
