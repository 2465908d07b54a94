"""Crash and hang detection by heartbeats, so the leader learns a worker is gone without waiting on it.

Each simulated device beats every `interval_s` from a thread of its own (long compute cannot starve it);
the leader's monitor declares a device dead once its last beat is older than `timeout_s`. Time comes from
an injectable clock, so detection and its latency (crash -> declaration) are testable without real waiting.
"""
from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterable

Clock = Callable[[], float]  # seconds, monotonic


@dataclass(frozen=True)
class HeartbeatConfig:
    """How often devices beat and how much silence the leader tolerates before declaring one dead."""

    interval_s: float = 1.0
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.interval_s) and math.isfinite(self.timeout_s)):
            raise ValueError(f"heartbeat interval and timeout must be finite numbers of seconds, "
                             f"got {self.interval_s} and {self.timeout_s}")
        if self.interval_s <= 0:
            raise ValueError(f"heartbeat interval ({self.interval_s} s) must be positive")
        if self.timeout_s <= self.interval_s:
            raise ValueError(
                f"heartbeat timeout ({self.timeout_s} s) must be larger than the interval ({self.interval_s} s)"
            )


@dataclass(frozen=True)
class Detection:
    """One declaration of death, with the times needed to measure how long detection took."""

    device: int
    last_beat_at: float  # clock time of the last beat seen
    declared_at: float  # clock time the monitor declared it dead
    epoch: int = 1  # the epoch the declaration opened: messages stamped with an older one are refused
    signal: str = "heartbeat"  # what revealed the death: "heartbeat" (silence) or another signal

    @property
    def silence_s(self) -> float:
        """How long the device had been silent when declared dead: an upper bound on detection latency."""
        return self.declared_at - self.last_beat_at


class FakeClock:
    """A clock that moves only when told, so tests can step through timeouts without sleeping."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move time forward (never back: the clock stands in for a monotonic one); returns the new time."""
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back ({seconds} s)")
        with self._lock:
            self._now += seconds
            return self._now

    def __call__(self) -> float:
        return self.now()


class BeatVerdict(str, Enum):
    """What the monitor did with a beat."""

    ACCEPTED = "accepted"
    STALE_EPOCH = "stale epoch"      # sent from an epoch older than the current one: fenced
    DECLARED_DEAD = "declared dead"  # the device was declared dead: it must not come back to life
    NOT_WATCHED = "not watched"      # never added, or removed after a recovery


class HeartbeatMonitor:
    """The leader's view: the time of each device's last beat, and the current epoch. Thread-safe (a lock).

    Beats come from sender threads while `check` runs on the monitor thread, hence the lock. Every
    declaration of death opens a new epoch; a beat stamped with an older epoch is refused first
    (fencing), then beats of devices declared dead or not watched. Refused beats are counted.
    """

    def __init__(self, devices: Iterable[int], config: HeartbeatConfig, clock: Clock = time.monotonic,
                 on_beat: Callable[[int, float], None] | None = None) -> None:
        self.config = config
        self._clock = clock
        self._on_beat = on_beat  # told of every accepted beat (device, time), e.g. for a timeline
        self._lock = threading.Lock()
        now = clock()
        self._last: dict[int, float] = {d: now for d in devices}  # all count as having beaten at start
        self._excused: dict[int, float] = {d: 0.0 for d in devices}  # silence the watcher did not see
        self._dead: set[int] = set()
        self._epoch = 0
        self._refused: Counter[tuple[int, int, BeatVerdict]] = Counter()

    @property
    def epoch(self) -> int:
        """Opened anew by each declaration of death; beats tagged with an older epoch are fenced off."""
        with self._lock:
            return self._epoch

    def beat(self, device: int, epoch: int = 0) -> BeatVerdict:
        """Record a beat now, unless fenced: a stale epoch or a device declared dead must not come back to life."""
        with self._lock:
            if epoch < self._epoch:
                verdict = BeatVerdict.STALE_EPOCH
            elif device in self._dead:
                verdict = BeatVerdict.DECLARED_DEAD
            elif device not in self._last:
                verdict = BeatVerdict.NOT_WATCHED
            else:
                verdict = BeatVerdict.ACCEPTED
                self._last[device] = beat_at = self._clock()
                self._excused[device] = 0.0
            if verdict is not BeatVerdict.ACCEPTED:
                self._refused[(device, epoch, verdict)] += 1
                return verdict
        if self._on_beat is not None:
            self._on_beat(device, beat_at)
        return verdict

    def refused(self) -> dict[tuple[int, int, BeatVerdict], int]:
        """Refused beats so far: (device, the epoch it stamped, why) -> how many."""
        with self._lock:
            return dict(self._refused)

    def excuse(self, seconds: float) -> None:
        """The watcher itself did not run for `seconds` (a stalled process, a busy handler): silence in that
        time proves nothing against a device, so it is not counted (a real death is declared that much later)."""
        with self._lock:
            for device in self._excused:
                self._excused[device] += seconds

    def check(self) -> list[Detection]:
        """Declare dead every live device silent for strictly more than timeout_s (excused time apart);
        each is reported once only."""
        with self._lock:
            now = self._clock()
            silent = [(d, last) for d, last in sorted(self._last.items())
                      if d not in self._dead and now - last - self._excused[d] > self.config.timeout_s]
            if not silent:
                return []
            self._epoch += 1
            self._dead.update(d for d, _ in silent)
            return [Detection(d, last, now, self._epoch) for d, last in silent]

    def declare(self, device: int, signal: str) -> Detection | None:
        """Declare a device dead at once on another signal than silence (None if it already was)."""
        with self._lock:
            if device in self._dead or device not in self._last:
                return None
            self._epoch += 1
            self._dead.add(device)
            return Detection(device, self._last[device], self._clock(), self._epoch, signal)

    def alive(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(sorted(d for d in self._last if d not in self._dead))

    def dead(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(sorted(self._dead))

    def last_beat(self, device: int) -> float:
        """Clock time of the device's last accepted beat; KeyError if it is not watched."""
        with self._lock:
            return self._last[device]

    def remove(self, device: int) -> None:
        """Stop watching a device (e.g. retired after recovery); later beats from it are ignored."""
        with self._lock:
            self._last.pop(device, None)
            self._excused.pop(device, None)
            self._dead.discard(device)


class HeartbeatSender:
    """A device's beating thread: calls monitor.beat(device, epoch) every interval_s until stopped or silenced.

    It is a thread of its own so that the device's compute cannot delay its beats (torch releases the GIL).
    `epoch_fn` gives the device's own epoch (the last it was admitted to), so a device that missed a
    declaration stamps a stale one.
    """

    def __init__(
        self,
        device: int,
        monitor: HeartbeatMonitor,
        interval_s: float,
        epoch_fn: Callable[[], int] = lambda: 0,
        name: str | None = None,
    ) -> None:
        self.device = device
        self._monitor = monitor
        self._interval_s = interval_s
        self._epoch_fn = epoch_fn
        self._halt = threading.Event()
        self._paused = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name or f"heartbeat-{device}", daemon=False)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        self._beat()  # at once, so a fresh device is not judged by its construction time
        while not self._halt.wait(self._interval_s):
            self._beat()

    def _beat(self) -> None:
        if not self._paused.is_set():
            self._monitor.beat(self.device, self._epoch_fn())

    def pause(self) -> None:
        """Simulate a hang: no beat until `resume` (the thread stays, as a stopped process's would)."""
        self._paused.set()

    def resume(self) -> None:
        """The hung device wakes: it beats again, stamped with its own (by now perhaps stale) epoch."""
        self._paused.clear()

    def silence(self) -> None:
        """Simulate a crash: no beat happens after this returns (the thread has exited)."""
        self._end()

    def stop(self) -> None:
        """Clean end of run: the thread wakes at once and is joined."""
        self._end()

    def _end(self) -> None:
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join()


class MonitorThread:
    """The leader's watcher: polls monitor.check() every poll_s (default interval_s/4) and calls on_dead(detection) for each newly dead device.

    An exception from on_dead does not end the watching (other devices still need it): the first one
    is kept and re-raised from stop(), so it is never lost silently.
    """

    def __init__(
        self,
        monitor: HeartbeatMonitor,
        on_dead: Callable[[Detection], None],
        poll_s: float | None = None,
        name: str = "heartbeat-monitor",
    ) -> None:
        self._monitor = monitor
        self._on_dead = on_dead
        self._poll_s = monitor.config.interval_s / 4 if poll_s is None else poll_s
        self._halt = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=False)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        looked_at = time.monotonic()
        while not self._halt.wait(self._poll_s):
            now = time.monotonic()
            if now - looked_at > 2 * self._poll_s:  # this thread did not look meanwhile (stalled, or busy
                self._monitor.excuse(now - looked_at - self._poll_s)  # in a handler): no one is blamed for it
            looked_at = now
            for detection in self._monitor.check():
                self._report(detection)

    def _report(self, detection: Detection) -> None:
        try:
            self._on_dead(detection)
        except Exception as error:  # kept for stop(); watching goes on
            if self._error is None:
                self._error = error

    def stop(self) -> None:
        """Stop polling, join, and re-raise the first exception raised by on_dead, if any."""
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
