"""Heartbeat detection: who is declared dead, when, exactly once, and never by mistake."""
from __future__ import annotations

import pytest

from device_protocol import Progress
from heartbeat_detection import BeatVerdict, Detection, FakeClock, HeartbeatConfig, HeartbeatMonitor, culprits



# --- configuration -------------------------------------------------------------------------------


def test_config_defaults_are_one_second_interval_and_five_second_timeout():
    config = HeartbeatConfig()
    assert (config.interval_s, config.timeout_s) == (1.0, 5.0)


@pytest.mark.parametrize("timeout", [1.0, 0.5])
def test_config_rejects_timeout_not_larger_than_interval(timeout):
    with pytest.raises(ValueError, match="must be larger than the interval"):
        HeartbeatConfig(interval_s=1.0, timeout_s=timeout)


@pytest.mark.parametrize("interval", [0.0, -1.0])
def test_config_rejects_non_positive_interval(interval):
    with pytest.raises(ValueError, match="must be positive"):
        HeartbeatConfig(interval_s=interval, timeout_s=5.0)


# --- fake clock: exact timing ----------------------------------------------------------------------


def test_fake_clock_moves_only_when_advanced():
    clock = FakeClock()
    assert clock() == clock.now() == 0.0
    assert clock.advance(1.5) == 1.5
    assert clock() == 1.5
    with pytest.raises(ValueError):
        clock.advance(-1.0)


def test_devices_beating_every_interval_stay_alive_over_many_intervals():
    clock = FakeClock()
    monitor = HeartbeatMonitor([0, 1, 2], HeartbeatConfig(), clock)
    for _ in range(100):
        clock.advance(1.0)
        for device in (0, 1, 2):
            monitor.beat(device)
        assert monitor.check() == []
    assert monitor.alive() == (0, 1, 2)
    assert monitor.dead() == ()


def test_silence_while_the_watcher_itself_was_stalled_is_excused_until_the_next_beat():
    clock = FakeClock()
    monitor = HeartbeatMonitor([0, 1], HeartbeatConfig(interval_s=1.0, timeout_s=5.0), clock)
    clock.advance(8.0)
    monitor.excuse(4.0)  # the watcher did not run for 4 of those 8 s
    monitor.beat(1)
    assert monitor.check() == []  # device 0: 8 s silent, 4 excused
    clock.advance(1.5)
    assert [d.device for d in monitor.check()] == [0]  # 5.5 s counted: dead
    clock.advance(5.5)
    assert [d.device for d in monitor.check()] == [1]  # its beat cleared what was excused


def test_every_device_counts_as_having_beaten_at_construction():
    clock = FakeClock(start=10.0)
    monitor = HeartbeatMonitor([3, 1], HeartbeatConfig(), clock)
    assert monitor.last_beat(1) == monitor.last_beat(3) == 10.0
    assert monitor.alive() == (1, 3)


def test_silent_device_is_alive_at_exactly_timeout_and_dead_just_after():
    clock = FakeClock()
    monitor = HeartbeatMonitor([0, 1], HeartbeatConfig(interval_s=1.0, timeout_s=5.0), clock)
    # device 1 stops beating at t=0; device 0 keeps beating
    while clock() < 5.0:
        clock.advance(0.25)
        monitor.beat(0)
        if clock() <= 5.0:
            assert monitor.check() == [], f"declared dead too early at t={clock()}"
    assert clock() - monitor.last_beat(1) == 5.0  # exactly the timeout: still alive
    assert monitor.alive() == (0, 1)

    clock.advance(0.25)
    monitor.beat(0)
    assert monitor.check() == [Detection(device=1, last_beat_at=0.0, declared_at=5.25)]
    assert monitor.alive() == (0,)
    assert monitor.dead() == (1,)


def test_dead_device_is_declared_only_once():
    clock = FakeClock()
    monitor = HeartbeatMonitor([0], HeartbeatConfig(), clock)
    clock.advance(6.0)
    assert [d.device for d in monitor.check()] == [0]
    for _ in range(5):
        clock.advance(1.0)
        assert monitor.check() == []
    assert monitor.dead() == (0,)


def test_slow_but_beating_worker_every_4_9_seconds_stays_alive():
    clock = FakeClock()
    monitor = HeartbeatMonitor([0], HeartbeatConfig(interval_s=1.0, timeout_s=5.0), clock)
    for _ in range(50):
        clock.advance(4.9)
        assert monitor.check() == []  # checked just before the late beat: 4.9 s of silence
        monitor.beat(0)
    assert monitor.alive() == (0,)


def test_detection_latency_is_at_most_timeout_plus_poll_period():
    config = HeartbeatConfig(interval_s=1.0, timeout_s=5.0)
    poll = config.interval_s / 4
    for crash_at in (3.0, 3.1, 3.3, 3.9):  # crashes at various phases of the poll cycle
        clock = FakeClock()
        monitor = HeartbeatMonitor([0], config, clock)
        detections: list[Detection] = []
        next_beat = 0.0
        while not detections:
            clock.advance(poll)
            if clock() >= next_beat and clock() < crash_at:
                monitor.beat(0)
                next_beat += config.interval_s
            detections = monitor.check()
        (found,) = detections
        silence_start = found.last_beat_at  # the last beat before the crash
        assert silence_start < crash_at
        latency = found.declared_at - silence_start
        assert found.silence_s == latency
        assert config.timeout_s < latency <= config.timeout_s + poll


def test_removed_device_is_no_longer_watched_and_its_beats_are_ignored():
    clock = FakeClock()
    monitor = HeartbeatMonitor([0, 1], HeartbeatConfig(), clock)
    monitor.remove(1)
    monitor.beat(1)
    clock.advance(10.0)
    monitor.beat(0)
    assert monitor.check() == []
    assert monitor.alive() == (0,)
    with pytest.raises(KeyError):
        monitor.last_beat(1)


# --- fencing -----------------------------------------------------------------------------------------


def test_beat_from_a_device_already_declared_dead_is_ignored():
    clock = FakeClock()
    monitor = HeartbeatMonitor([0], HeartbeatConfig(), clock)
    clock.advance(6.0)
    assert len(monitor.check()) == 1
    monitor.beat(0)  # the hung device wakes up
    assert monitor.last_beat(0) == 0.0
    assert monitor.dead() == (0,)
    assert monitor.alive() == ()


def test_every_declaration_opens_an_epoch_of_its_own_even_in_the_same_poll():
    clock = FakeClock()
    monitor = HeartbeatMonitor([0, 1, 2], HeartbeatConfig(), clock)
    assert monitor.epoch == 0
    clock.advance(6.0)
    monitor.beat(2)
    found = monitor.check()  # devices 0 and 1 declared in the same poll: two epochs, two groups of survivors
    assert [(d.device, d.epoch) for d in found] == [(0, 1), (1, 2)]
    assert monitor.epoch == 2
    clock.advance(6.0)
    assert [(d.device, d.epoch) for d in monitor.check()] == [(2, 3)]
    assert monitor.epoch == 3


def test_a_new_epoch_gives_the_survivors_a_whole_timeout_to_hear_of_it():
    """Until a survivor hears of the new epoch its beats are refused as stale: its silence must be
    counted from the declaration, or a slow delivery of the news would declare it dead too."""
    clock = FakeClock()
    monitor = HeartbeatMonitor([0, 1, 2], HeartbeatConfig(interval_s=1.0, timeout_s=5.0), clock)
    clock.advance(3.0)
    monitor.beat(0)
    clock.advance(3.0)  # 1 and 2 silent 6 s, 0 silent 3 s
    assert [d.device for d in monitor.check()] == [1, 2]  # both declared in one check, each its own epoch
    clock.advance(4.0)  # 0 silent 7 s since its beat, but only 4 s since the new epochs began
    assert monitor.beat(0, epoch=1) is BeatVerdict.STALE_EPOCH
    assert monitor.check() == []
    clock.advance(1.5)
    assert [d.device for d in monitor.check()] == [0]


def test_beat_stamped_with_an_ended_epoch_is_refused_for_its_epoch_and_counted():
    clock = FakeClock()
    monitor = HeartbeatMonitor([0, 1], HeartbeatConfig(), clock)
    clock.advance(4.0)
    monitor.beat(0)
    clock.advance(2.0)  # device 1 silent 6 s: declared, epoch 1 begins
    assert [d.device for d in monitor.check()] == [1]
    clock.advance(1.0)
    assert monitor.beat(0, epoch=0) is BeatVerdict.STALE_EPOCH  # a live device that missed the news
    assert monitor.last_beat(0) == 6.0  # not counted: its silence runs from the new epoch's start
    assert monitor.beat(1, epoch=0) is BeatVerdict.STALE_EPOCH  # the dead one: its epoch refuses it first
    assert monitor.beat(1, epoch=1) is BeatVerdict.DECLARED_DEAD
    assert monitor.beat(0, epoch=1) is BeatVerdict.ACCEPTED
    assert monitor.last_beat(0) == 7.0
    monitor.remove(1)
    assert monitor.beat(1, epoch=1) is BeatVerdict.NOT_WATCHED
    assert monitor.refused() == {(0, 0, BeatVerdict.STALE_EPOCH): 1, (1, 0, BeatVerdict.STALE_EPOCH): 1,
                                 (1, 1, BeatVerdict.DECLARED_DEAD): 1, (1, 1, BeatVerdict.NOT_WATCHED): 1}


def test_declaring_on_another_signal_opens_an_epoch_at_once_and_only_once():
    clock = FakeClock()
    monitor = HeartbeatMonitor([0, 1], HeartbeatConfig(), clock)
    clock.advance(0.5)
    detection = monitor.declare(1, "collective")
    assert detection == Detection(device=1, last_beat_at=0.0, declared_at=0.5, epoch=1, signal="collective")
    assert monitor.dead() == (1,) and monitor.epoch == 1
    assert monitor.declare(1, "collective") is None  # already declared
    assert monitor.declare(7, "collective") is None  # not watched
    clock.advance(10.0)
    monitor.beat(0, epoch=1)
    assert monitor.check() == []  # not declared a second time by its silence
    assert monitor.epoch == 1


# --- phi accrual: suspicion from the observed gaps ---------------------------------------------------

PHI = HeartbeatConfig(interval_s=1.0, timeout_s=5.0, detector="phi", phi_threshold=8.0)


def beat_with_gaps(monitor: HeartbeatMonitor, clock: FakeClock, gaps: list[float]) -> None:
    for gap in gaps:
        clock.advance(gap)
        monitor.beat(0)
        assert monitor.check() == []


def declared_after(monitor: HeartbeatMonitor, clock: FakeClock, step: float = 0.01) -> float:
    """Seconds of silence, in `step`s, until the monitor declares device 0 dead."""
    silence = 0.0
    while not monitor.check():
        clock.advance(step)
        silence += step
    return silence


@pytest.mark.parametrize("bad", [{"detector": "gossip"}, {"phi_threshold": 0.0}, {"phi_threshold": float("nan")}])
def test_config_rejects_an_unknown_detector_or_a_threshold_that_is_not_positive(bad):
    with pytest.raises(ValueError, match="detector|phi threshold"):
        HeartbeatConfig(**bad)


def test_phi_declares_a_steady_device_in_under_half_the_fixed_timeout():
    clock = FakeClock()
    monitor = HeartbeatMonitor([0], PHI, clock)
    beat_with_gaps(monitor, clock, [1.0] * 50)
    silence = declared_after(monitor, clock)
    # mean gap 1 s + half an interval acceptable + 5.6 deviations of the 0.1 s floor (phi 8: 1e-8)
    assert 2.0 < silence < 2.1 < PHI.timeout_s / 2


def test_phi_gives_a_device_with_irregular_beats_more_time_than_a_steady_one():
    clock = FakeClock()
    steady, irregular = HeartbeatMonitor([0], PHI, clock), HeartbeatMonitor([0], PHI, clock)
    beat_with_gaps(steady, clock, [1.0] * 50)
    steady_silence = declared_after(steady, clock)
    beat_with_gaps(irregular, clock, [0.6, 1.4] * 25)  # the same mean, a deviation of 0.4 s
    irregular_silence = declared_after(irregular, clock)
    assert irregular_silence > steady_silence + 1.5


def test_phi_suspicion_grows_with_the_silence_and_a_beat_clears_it():
    clock = FakeClock()
    monitor = HeartbeatMonitor([0], PHI, clock)
    beat_with_gaps(monitor, clock, [1.0] * 10)
    levels = []
    for _ in range(6):
        clock.advance(0.4)
        levels.append(monitor.suspicion(0))
    assert levels == sorted(levels) and levels[0] < 1.0 < PHI.phi_threshold < levels[-1]
    monitor.beat(0)
    assert monitor.suspicion(0) < 1.0


def test_phi_counts_no_gap_the_watcher_did_not_see_whole():
    """Beats queued while the watcher stalled arrive together: their gaps say nothing of the device."""
    clock = FakeClock()
    monitor = HeartbeatMonitor([0], PHI, clock)
    beat_with_gaps(monitor, clock, [1.0] * 10)
    clock.advance(3.0)
    monitor.excuse(2.5)
    monitor.beat(0)
    monitor.beat(0)  # the queued beats, a moment apart
    beat_with_gaps(monitor, clock, [1.0] * 3)
    assert 2.0 < declared_after(monitor, clock) < 2.1  # as steady as before: neither 3 s nor 0 s was counted


def test_phi_never_tolerates_more_silence_than_the_fixed_timeout():
    """Very irregular beats would let phi wait long; the fixed timeout stays the bound (the leader's
    other waits are sized by it)."""
    clock = FakeClock()
    monitor = HeartbeatMonitor([0], HeartbeatConfig(interval_s=1.0, timeout_s=3.0, detector="phi"), clock)
    beat_with_gaps(monitor, clock, [0.5, 2.5] * 20)
    assert 3.0 < declared_after(monitor, clock) < 3.02


# --- progress: a wedged compute thread behind live beats ---------------------------------------------


def busy(entered: int, in_call: bool, ticks: int = 0, request: int = 7) -> Progress:
    return Progress("Forward", request, 0, entered, in_call, ticks)


def test_the_culprit_is_the_device_outside_a_call_or_behind_its_peers_and_level_waiters_are_nobodys():
    wedged, waiting = busy(4, in_call=False), busy(5, in_call=True)
    assert culprits({1: wedged, 2: waiting}, {0: waiting, 1: wedged, 2: waiting}) == [1]
    assert culprits({0: waiting, 2: waiting}, {0: waiting, 2: waiting}) == []  # level inside one call
    assert culprits({3: busy(2, in_call=True)}, {0: busy(3, in_call=True), 3: busy(2, in_call=True)}) == [3]
    assert culprits({3: busy(2, in_call=True)}, {0: busy(3, in_call=True, request=8), 3: busy(2, True)}) == []
    assert culprits({1: wedged}, {1: wedged, 0: Progress()}) == [1]  # lone and busy, outside any call


def wedge_scene(config: HeartbeatConfig, seconds: float, step_s: float = 0.1) -> tuple[list[Detection], float]:
    """Device 0 watches 1, 2, 3 and computes itself; device 2 wedges outside a call at t=1 (beating on),
    the others wait for it inside the next call; the others tick until then. Detections and their time."""
    clock = FakeClock()
    monitor = HeartbeatMonitor([1, 2, 3], config, clock)
    ticks = 0
    while clock() < seconds:
        clock.advance(step_s)
        ticks += 1
        stuck = clock() > 1.0
        for device in (0, 1, 2, 3):
            progress = busy(5, True) if stuck and device != 2 else busy(4, False, 0 if stuck else ticks)
            if device == 0:
                monitor.observe(0, progress)
            else:
                monitor.beat(device, progress=progress)
        found = monitor.check() + monitor.check_progress()
        if found:
            return found, clock()
    return [], clock()


def test_a_wedged_device_that_beats_on_is_declared_for_its_lack_of_progress_and_only_it():
    config = HeartbeatConfig(interval_s=0.1, timeout_s=0.5)
    (detection,), at = wedge_scene(config, 5.0)
    assert (detection.device, detection.signal, detection.stuck_in) == (2, "no-progress", "Forward")
    assert detection.silence_s > config.timeout_s and at <= 1.1 + config.timeout_s + 0.2


def test_phi_accrual_on_progress_declares_a_wedge_sooner_than_the_timeout():
    config = HeartbeatConfig(interval_s=0.1, timeout_s=2.0, detector="phi")
    (detection,), at = wedge_scene(config, 5.0)
    assert detection.device == 2 and detection.signal == "no-progress"
    assert at - 1.0 < config.timeout_s / 2


def test_a_device_that_ticks_or_is_idle_is_never_declared_however_long_its_command():
    clock = FakeClock()
    monitor = HeartbeatMonitor([1, 2], HeartbeatConfig(interval_s=0.1, timeout_s=0.5), clock)
    for step in range(1, 200):
        clock.advance(0.1)
        monitor.beat(1, progress=busy(0, False, ticks=step // 3))  # a long prefill: a layer every 0.3 s
        monitor.beat(2, progress=Progress())  # idle all along
        assert monitor.check() + monitor.check_progress() == []


def test_a_stall_while_the_watcher_itself_was_stalled_is_excused():
    clock = FakeClock()
    monitor = HeartbeatMonitor([1], HeartbeatConfig(interval_s=0.1, timeout_s=0.5), clock)
    monitor.beat(1, progress=busy(0, False))
    clock.advance(0.8)
    monitor.excuse(0.6)
    monitor.beat(1, progress=busy(0, False), age_s=0.8)
    assert monitor.check_progress() == []
    clock.advance(0.4)
    monitor.beat(1, progress=busy(0, False), age_s=1.2)
    assert [d.device for d in monitor.check_progress()] == [1]


def test_a_beat_dates_the_last_progress_by_its_age_not_by_its_own_arrival():
    """The beater says how long its progress has stood: a wedge is timed from when it struck, not
    from the next beat that told of it (up to an interval later)."""
    clock = FakeClock()
    monitor = HeartbeatMonitor([1], HeartbeatConfig(interval_s=0.2, timeout_s=0.5), clock)
    clock.advance(1.0)
    monitor.beat(1, progress=busy(3, False), age_s=0.19)  # changed 0.19 s before this beat
    assert monitor.progressed_at(1) == pytest.approx(0.81)
    clock.advance(0.2)
    monitor.beat(1, progress=busy(3, False), age_s=0.39)  # it beats on, stuck
    clock.advance(0.1)
    assert monitor.check_progress() == []
    clock.advance(0.02)  # 0.51 s since the change
    (detection,) = monitor.check_progress()
    assert detection.last_beat_at == pytest.approx(0.81) and detection.silence_s == pytest.approx(0.51)


def test_a_device_that_fell_silent_while_busy_is_declared_by_its_silence_not_its_progress():
    """A hang stops the beats with the compute: its last beat said "busy", but a stall the beats no
    longer vouch for is the silence's to judge, so the signal says what happened."""
    clock = FakeClock()
    config = HeartbeatConfig(interval_s=0.1, timeout_s=0.5)
    monitor = HeartbeatMonitor([1], config, clock)
    clock.advance(1.0)
    monitor.beat(1, progress=busy(3, False), age_s=0.05)
    found = []
    while not found:
        clock.advance(0.01)
        found = monitor.check() + monitor.check_progress()
    assert [(d.device, d.signal) for d in found] == [(1, "heartbeat")]
