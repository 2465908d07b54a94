"""The pictures: a timeline from a real (tiny) run with a crash, recovery time against context, and the
demo writing its timeline beside the report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster_leader import StepFailed
from device_protocol import RecoveryPolicy
from execution_optimization_algorithm_demo import main as demo_main
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama
from heartbeat_detection import HeartbeatConfig
from kv_cache_reused import STRATEGIES
from recovery_plots import plot_phases, plot_recovery_vs_context, plot_timeline, read_events

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST_BEATS = HeartbeatConfig(0.05, 0.25)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 10_000, f"{path} is only {len(data)} bytes"
    assert not list(path.parent.glob(f".{path.name}.*.tmp")), "a temporary file was left behind"


@pytest.fixture(scope="module")
def crash_events(tiny_checkpoint) -> list[tuple[float, int, str, float]]:
    """Events of a tiny 4-device run: prefill, a crash of Device-1 mid-step, detection, every
    strategy timed from the post-failure state, then two resumed decode steps."""
    model = FaultTolerantLlama.load(tiny_checkpoint, devices=4, heartbeat=FAST_BEATS, log=lambda m: None,
                                    policy=RecoveryPolicy(hold=True))
    try:
        model.keep(True, True)
        token = int(model.prefill(list(range(1, 41))).argmax())
        token = int(model.decode(token).argmax())
        model.arm(FailurePlan(1, after_tokens=2))
        with pytest.raises(StepFailed):
            model.decode(token)
        model.prepare_recovery()
        for _ in range(2):
            for name in STRATEGIES:
                assert model.rebuild(name).strategy == name
        model.rebuild("reuse-hidden")
        model.decode(token)
        model.decode(token)
        return list(model.events)
    finally:
        model.close()


def test_each_rebuild_is_a_span_on_every_survivor(crash_events):
    survivors = {0, 2, 3}
    for name in STRATEGIES:
        runs = 3 if name == "reuse-hidden" else 2
        spans = [(d, duration) for _, d, kind, duration in crash_events if kind == f"rebuild KV: {name}"]
        assert sorted(d for d, _ in spans) == sorted(list(survivors) * runs)
        assert all(duration >= 0 for _, duration in spans)


def test_read_events_finds_the_detection_and_the_resumed_generation(crash_events):
    timeline = read_events(crash_events)
    assert timeline.devices == (0, 1, 2, 3)
    [detection] = timeline.detections
    assert detection.device == 1 and 0 < detection.latency < 2.0
    rebuild_ends = [s.end for s in timeline.spans if s.kind == "rebuild KV"]
    assert {s.label for s in timeline.spans if s.kind == "rebuild KV"} == set(STRATEGIES)
    assert timeline.resumed is not None and timeline.resumed >= max(rebuild_ends)
    assert set(timeline.beats) == {0, 1, 2, 3}


def test_read_events_with_fake_events():
    events = [(10.0, 0, "beat", 0.0), (10.5, 0, "compute", 0.2), (11.0, 1, "died", 0.0),
              (12.0, 1, "declared dead", 0.0), (12.1, 0, "load weights", 0.1), (12.3, 0, "rebuild KV", 0.2),
              (12.6, 0, "rebuild KV: replicate", 0.1), (12.9, 0, "compute", 0.1), (13.5, 0, "compute", 0.1)]
    timeline = read_events(reversed(events))  # order does not matter
    [detection] = timeline.detections
    assert detection.died == pytest.approx(1.0) and detection.latency == pytest.approx(1.0)
    assert timeline.resumed == pytest.approx(2.9)
    assert [s.label for s in timeline.spans if s.kind == "rebuild KV"] == ["rebuild KV", "replicate"]


def test_plot_timeline_writes_a_png_from_a_real_run(crash_events, tmp_path):
    path = plot_timeline(crash_events, tmp_path / "timeline.png", "tiny: Device-1 crashes")
    assert path == tmp_path / "timeline.png"
    assert_png(path)


def test_plot_timeline_without_a_failure(tmp_path):
    events = [(0.1 * i, d, "beat", 0.0) for i in range(20) for d in range(2)]
    events += [(0.3, d, "compute", 0.5) for d in range(2)]
    assert_png(plot_timeline(events, tmp_path / "plain.png", "no failure"))


def test_plot_timeline_zooms_on_a_short_recovery_in_a_long_run(tmp_path):
    events = [(1000.0 + i, d, "beat", 0.0) for d in range(4) for i in range(120) if d != 1 or i <= 100]
    events += [(1000.0 + 2 * i, d, "compute", 1.8) for d in range(4) for i in range(50)]
    events += [(1030.0, 3, "stalled", 4.0), (1100.2, 1, "died", 0.0), (1102.0, 1, "declared dead", 0.0),
               (1102.05, 2, "load weights", 0.4)]
    t = 1102.5
    for name, duration in (("full-recompute", 0.8), ("reuse-hidden", 0.02), ("replicate", 0.005)):
        events += [(t, d, f"rebuild KV: {name}", duration) for d in (0, 2, 3)]
        t += duration + 0.01
    events += [(t + 0.05 + 0.3 * i, d, "compute", 0.25) for d in (0, 2, 3) for i in range(8)]
    timeline = read_events(events)
    assert timeline.resumed == pytest.approx(t + 0.05 - 1000.0)
    assert_png(plot_timeline(events, tmp_path / "zoom.png", "a long run, a short recovery"))


def test_plot_recovery_vs_context_writes_a_png_from_rows(tmp_path):
    rows = []
    for devices in (4, 8):
        for reassign in ("random", "balanced"):
            for context in (128, 512, 2048):
                for strategy, per_token in (("full-recompute", 0.02), ("reuse-replay", 0.019),
                                            ("reuse-hidden", 0.0002), ("replicate", 0.00005)):
                    median = per_token * context / devices * 4
                    rows.append({"devices": devices, "reassign": reassign, "context": context,
                                 "strategy": strategy, "median_s": median, "min_s": median * 0.9,
                                 "max_s": median * 1.2})
    assert_png(plot_recovery_vs_context(rows, tmp_path / "context.png"))
    minimal = [{"strategy": "replicate", "context": c, "median_s": 0.01} for c in (64, 128)]
    assert_png(plot_recovery_vs_context(minimal, tmp_path / "minimal.png"))


def test_demo_writes_its_pictures_beside_the_report_named_after_it(tiny_checkpoint, tmp_path, capsys):
    """Two runs with different --report paths never overwrite each other's pictures; the JSON twin
    the program writes is strict JSON."""
    report = tmp_path / "run" / "first.txt"
    report.parent.mkdir()
    code = demo_main(["--model-dir", str(tiny_checkpoint), "--heartbeat-interval", "0.05",
                      "--heartbeat-timeout", "0.25", "--context-tokens", "32", "--repeats", "1",
                      "--report", str(report), "--quiet"])
    assert code == 0, capsys.readouterr().err
    timeline, phases = report.parent / "first.timeline.png", report.parent / "first.phases.png"
    assert_png(timeline) and assert_png(phases)
    saved = json.loads(report.with_suffix(".json").read_text(), parse_constant=refuse_non_finite)
    assert saved["files"] == {"timeline": str(timeline), "phases": str(phases)}
    assert str(timeline) in report.read_text()
    assert sorted(p.name for p in report.parent.iterdir()) == ["first.json", "first.phases.png",
                                                                 "first.timeline.png", "first.txt"]


def refuse_non_finite(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_the_phases_picture_stacks_each_strategys_interruption(tmp_path):
    rows = [{"name": name, "interruption_s": 1.0 + i, "interruption_phases": {
        "detection_s": 0.5, "regroup_s": 0.01, "weights_s": 0.2, "rebuild_s": 0.29 + i, "redo_s": 0.0}}
        for i, name in enumerate(STRATEGIES)] + [{"name": "could-not-run", "error": "no copy"}]
    assert_png(plot_phases(rows, tmp_path / "phases.png", "four strategies"))
    with pytest.raises(ValueError):
        plot_phases(rows[-1:], tmp_path / "none.png", "nothing ran")
