"""Crash, hang and wedge detection by heartbeats, so a device learns another is gone without waiting on it.

Each device beats every `interval_s` from its control thread (long compute cannot starve it): the
members to the leader, the leader to every member. A `HeartbeatMonitor` declares a device dead when
its detector says its silence is too long, or at once on another signal (`declare`); every
declaration opens a new epoch, and beats stamped with an ended one are refused (fencing). Two
detectors: the seed's fixed `timeout_s`, and phi accrual (Hayashibara et al., as Cassandra and Akka
use it): suspicion grows with the silence measured against the observed distribution of this
device's heartbeat gaps, so a steady device is declared soon after it stops, and a device whose
beats come irregularly (a loaded machine) is given more time. Time comes from an injectable clock,
so detection and its latency are testable without real waiting.

Beats prove that a control thread lives, not that compute does: each also carries the beater's
compute `Progress` (device_protocol.py). A device that has had work in hand and made no progress
for the detector's limit (the fixed timeout, or phi accrual on the gaps between its progress) is
declared on `no-progress` when it is stuck itself (`culprits`): outside any collective call, or
behind a peer of the same request in calls entered (its peers wait for it inside the next call).
Devices stalled level, each inside the same call, are nobody's culprit: the waits on them end.
"""
from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterable, Mapping

from device_protocol import Progress

Clock = Callable[[], float]  # seconds, monotonic
DETECTORS = ("timeout", "phi")


@dataclass(frozen=True)
class HeartbeatConfig:
    """How often devices beat and how much silence the leader tolerates before declaring one dead:
    `timeout_s` for the fixed detector; for phi accrual, the suspicion `phi_threshold` (phi 8: the
    silence would be that long by chance once in 10^8 gaps of the observed distribution, shifted by
    the acceptable pause), with `timeout_s` still the longest silence it tolerates (the bound the
    leader's other waits are sized by)."""

    interval_s: float = 1.0
    timeout_s: float = 5.0
    detector: str = "timeout"
    phi_threshold: float = 8.0

    @property
    def wait_limit_s(self) -> float:
        """How long any wait may see no progress from what it waits for before it ends (WaitStalled):
        three detector timeouts, so that a wait ends on its own only when the detection that should
        have released it (a declaration, a new epoch) did not come."""
        return 3 * self.timeout_s

    @property
    def call_limit_s(self) -> float:
        """How long one collective call may wait for its peers: twice the wait limit, so that the
        leader's wait (which sees every device's progress, and names the culprit) always ends first;
        a call's own bound ends a device's wait only when no leader is left to end it."""
        return 2 * self.wait_limit_s

    def __post_init__(self) -> None:
        if not (math.isfinite(self.interval_s) and math.isfinite(self.timeout_s)):
            raise ValueError(f"heartbeat interval and timeout must be finite numbers of seconds, "
                             f"got {self.interval_s} and {self.timeout_s}")
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown failure detector {self.detector!r} (choose from {', '.join(DETECTORS)})")
        if not (math.isfinite(self.phi_threshold) and self.phi_threshold > 0):
            raise ValueError(f"phi threshold ({self.phi_threshold}) must be a positive number")
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
    signal: str = "heartbeat"  # what revealed the death: "heartbeat" (silence), "no-progress", or another signal
    stuck_in: str | None = None  # no-progress: the command the device was stuck in

    @property
    def silence_s(self) -> float:
        """How long the device had been silent (no-progress: without progress) when declared dead: an
        upper bound on detection latency."""
        return self.declared_at - self.last_beat_at


class PhiAccrual:
    """Suspicion of one device from the gaps between its beats (phi accrual, normal model).

    phi(silence) = -log10 P(a gap longer than `silence`), the gaps taken as normal with the mean and
    standard deviation of the last `WINDOW` gaps, shifted by an acceptable pause. As in Akka, the
    history starts from the configured interval (mean `interval`, deviation `interval / 4`), the
    deviation never falls below `interval / 10` (a perfectly steady device is not declared on its
    first late beat), and `interval / 2` of silence is always acceptable (a scheduling hiccup is
    not a death). A gap shorter than half the interval is not the device's pace but beats queued at
    the watcher (a device sends a late beat at once, then keeps its pace): it is not counted. Sums
    are kept running: `phi` runs on every check, many times a second.
    """

    WINDOW = 100

    def __init__(self, interval_s: float) -> None:
        self.min_std_s, self.acceptable_pause_s = interval_s / 10, interval_s / 2
        self.gaps: deque[float] = deque()
        self._sum = self._squares = 0.0
        for seed in (interval_s * 0.75, interval_s * 1.25):
            self._add(seed)

    def observe(self, gap_s: float) -> None:
        if gap_s >= self.acceptable_pause_s:
            self._add(gap_s)

    def _add(self, gap_s: float) -> None:
        if len(self.gaps) == self.WINDOW:
            old = self.gaps.popleft()
            self._sum, self._squares = self._sum - old, self._squares - old * old
        self.gaps.append(gap_s)
        self._sum, self._squares = self._sum + gap_s, self._squares + gap_s * gap_s

    def phi(self, silence_s: float) -> float:
        n = len(self.gaps)
        mean = self._sum / n
        std = max(math.sqrt(max(self._squares / n - mean * mean, 0.0)), self.min_std_s)
        later = 0.5 * math.erfc((silence_s - mean - self.acceptable_pause_s) / (std * math.sqrt(2)))
        return math.inf if later <= 0 else -math.log10(later)


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


@dataclass
class SeenProgress:
    """A device's last progress as a watcher saw it: since when it stands, and how much of that the
    watcher itself did not run (excused)."""

    progress: Progress
    changed_at: float
    excused: float = 0.0


def culprits(stalled: Mapping[int, Progress], alive: Mapping[int, Progress]) -> list[int]:
    """Of the devices busy without progress for the limit (`stalled`), those stuck themselves: outside
    any collective call (a device waiting inside one waits for a peer), or behind a live peer busy
    on the same request in calls entered (the peer waits for it in the next call). Devices stalled
    level inside the same call are nobody's culprit: no one is declared, and the waits on them end."""
    def behind(device: int, mine: Progress) -> bool:
        return any(other.busy and other.key == mine.key and other.entered > mine.entered
                   for peer, other in alive.items() if peer != device)
    return [d for d, mine in sorted(stalled.items()) if not mine.in_call or behind(d, mine)]


class BeatVerdict(str, Enum):
    """What the monitor did with a beat."""

    ACCEPTED = "accepted"
    STALE_EPOCH = "stale epoch"      # sent from an epoch older than the current one: fenced
    DECLARED_DEAD = "declared dead"  # the device was declared dead: it must not come back to life
    NOT_WATCHED = "not watched"      # never added, or removed after a recovery


class HeartbeatMonitor:
    """The leader's view: the time of each device's last beat, and the current epoch. Thread-safe (a lock).

    Beats come from the control thread's inbox while `check` runs there too, and the leader may
    declare from another thread, hence the lock. Every declaration of death opens a new epoch of
    its own; a beat stamped with an older epoch is refused first
    (fencing), then beats of devices declared dead or not watched. Refused beats are counted.
    """

    def __init__(self, devices: Iterable[int], config: HeartbeatConfig, clock: Clock = time.monotonic,
                 on_beat: Callable[[int, float], None] | None = None, epoch: int = 0) -> None:
        self.config = config
        self._clock = clock
        self._on_beat = on_beat  # told of every accepted beat (device, time), e.g. for a timeline
        self._lock = threading.Lock()
        now = self._started = clock()
        self._last: dict[int, float] = {d: now for d in devices}  # all count as having beaten at start
        self._excused: dict[int, float] = {d: 0.0 for d in devices}  # silence the watcher did not see
        self._phi = {d: PhiAccrual(config.interval_s) for d in devices} if config.detector == "phi" else {}
        self._heard: set[int] = set()  # devices whose last recorded time is a real beat (a gap can be measured)
        self._dead: set[int] = set()
        self._epoch = epoch
        self._refused: Counter[tuple[int, int, BeatVerdict]] = Counter()
        self._seen: dict[int, SeenProgress] = {}  # the last progress of each device (the watcher's own too)
        self._progress_phi: dict[int, PhiAccrual] = {}

    @property
    def epoch(self) -> int:
        """Opened anew by each declaration of death; beats tagged with an older epoch are fenced off."""
        with self._lock:
            return self._epoch

    def advance_epoch(self) -> int:
        """Open the next epoch without a death (a group re-formed after a device's error)."""
        with self._lock:
            self._epoch += 1
            return self._epoch

    def beat(self, device: int, epoch: int = 0, progress: Progress | None = None, age_s: float = 0.0
             ) -> BeatVerdict:
        """Record a beat now (and the progress it carries, which has stood for `age_s`), unless fenced:
        a stale epoch or a device declared dead must not come back to life."""
        with self._lock:
            if epoch < self._epoch:
                verdict = BeatVerdict.STALE_EPOCH
            elif device in self._dead:
                verdict = BeatVerdict.DECLARED_DEAD
            elif device not in self._last:
                verdict = BeatVerdict.NOT_WATCHED
            else:
                verdict = BeatVerdict.ACCEPTED
                beat_at = self._clock()
                if device in self._phi and device in self._heard and self._excused[device] == 0.0:
                    self._phi[device].observe(beat_at - self._last[device])  # a gap the watcher saw whole
                self._last[device], self._excused[device] = beat_at, 0.0
                self._heard.add(device)
                if progress is not None:
                    self._record(device, progress, beat_at - age_s)
            if verdict is not BeatVerdict.ACCEPTED:
                self._refused[(device, epoch, verdict)] += 1
                return verdict
        if self._on_beat is not None:
            self._on_beat(device, beat_at)
        return verdict

    def observe(self, device: int, progress: Progress, age_s: float = 0.0) -> None:
        """The watcher's own progress, known directly (it is judged beside the watched devices')."""
        with self._lock:
            self._record(device, progress, self._clock() - age_s)

    def _record(self, device: int, progress: Progress, changed_at: float) -> None:
        """A change of progress, dated when it happened (never before the last one, nor before a
        restart of the watching: what came before a new epoch is no one's fault)."""
        seen = self._seen.get(device)
        if seen is not None and seen.progress == progress:
            return
        changed_at = max(changed_at, self._started if seen is None else seen.changed_at)
        if self.config.detector == "phi" and device not in self._progress_phi:
            self._progress_phi[device] = PhiAccrual(self.config.interval_s)
        if seen is not None and seen.progress.busy and seen.excused == 0.0 and device in self._progress_phi:
            self._progress_phi[device].observe(changed_at - seen.changed_at)  # a gap in busy work, seen whole
        self._seen[device] = SeenProgress(progress, changed_at)

    def progressed_at(self, device: int) -> float:
        """Clock time of the device's last progress seen (of the start of watching, if none was)."""
        with self._lock:
            seen = self._seen.get(device)
            return self._started if seen is None else seen.changed_at

    def check_progress(self) -> list[Detection]:
        """Declare each watched device stuck with work in hand (`culprits`): no progress for longer
        than the detector tolerates silence. Each is reported once. The stall is counted only as far
        as the beats vouch for it (one interval past the last): a device that fell silent is the
        silence's to declare (a hang is not a wedge)."""
        with self._lock:
            now = self._clock()
            alive = {d: seen.progress for d, seen in self._seen.items() if d not in self._dead}
            stalled = {d: seen.progress for d, seen in self._seen.items()
                       if d in self._last and d not in self._dead and seen.progress.busy and
                       self._too_long(self._progress_phi.get(d), self._stall_s(d, seen, now))}
            return [self._declare(d, self._seen[d].changed_at, now, "no-progress", stalled[d].command)
                    for d in culprits(stalled, alive)]

    def _stall_s(self, device: int, seen: SeenProgress, now: float) -> float:
        vouched = min(now, self._last[device] + self.config.interval_s)
        return vouched - seen.changed_at - seen.excused

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
            for seen in self._seen.values():
                seen.excused += seconds

    def check(self) -> list[Detection]:
        """Declare dead every live device whose silence (excused time apart) is too long: strictly
        more than timeout_s, or sooner (phi accrual) a suspicion above the threshold. Each is
        reported once."""
        with self._lock:
            now = self._clock()
            silent = [(device, last) for device, last in sorted(self._last.items())
                      if device not in self._dead and self._too_long(self._phi.get(device),
                                                                     now - last - self._excused[device])]
            return [self._declare(device, last, now, "heartbeat") for device, last in silent]

    def _too_long(self, phi: PhiAccrual | None, silence_s: float) -> bool:
        """Strictly more than timeout_s, or (phi accrual) a suspicion above the threshold."""
        if silence_s > self.config.timeout_s:
            return True
        return phi is not None and phi.phi(silence_s) > self.config.phi_threshold

    def suspicion(self, device: int) -> float:
        """The device's phi now (phi accrual only): how unlikely its current silence is, as -log10."""
        with self._lock:
            return self._phi[device].phi(self._clock() - self._last[device] - self._excused[device])

    def declare(self, device: int, signal: str) -> Detection | None:
        """Declare a device dead at once on another signal than silence (None if it already was)."""
        with self._lock:
            if device in self._dead or device not in self._last:
                return None
            return self._declare(device, self._last[device], self._clock(), signal)

    def _declare(self, device: int, last: float, now: float, signal: str, stuck_in: str | None = None
                 ) -> Detection:
        """Each declaration opens an epoch of its own (each its own group of survivors). The survivors'
        beats stamped with the old epoch are refused until they hear of the new one, so their silence
        is counted from now: the new epoch starts as the watching did, with everyone heard (and their
        compute, which the new epoch releases from the old one's calls, as progressing)."""
        self._epoch += 1
        self._dead.add(device)
        for other in self._last:
            if other not in self._dead:
                self._last[other], self._excused[other] = max(self._last[other], now), 0.0
                self._heard.discard(other)
        self._restart_progress(now)
        return Detection(device, last, now, self._epoch, signal, stuck_in)

    def _restart_progress(self, now: float) -> None:
        for seen in self._seen.values():
            seen.changed_at, seen.excused = max(seen.changed_at, now), 0.0

    def restart(self) -> None:
        """Count every watched device as having beaten now (when watching begins in earnest)."""
        with self._lock:
            now = self._clock()
            for device in self._last:
                self._last[device], self._excused[device] = now, 0.0
            self._heard.clear()
            self._started = now
            self._restart_progress(now)

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
            self._phi.pop(device, None)
            self._seen.pop(device, None)
            self._progress_phi.pop(device, None)
            self._heard.discard(device)
            self._dead.discard(device)
