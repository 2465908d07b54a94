"""Specifications for the demo's command line (execution_optimization_algorithm_demo.py), end to end on
the tiny preset with short heartbeats."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import execution_optimization_algorithm_demo as demo
from batch_report import request_verdict
from batch_scenario import RequestCheck, near_tie_requests, verdict
from kv_cache_reused import STRATEGIES
from lossless_checks import LOGITS_TOLERANCE, REBUILT_KV_TOLERANCE, Divergence
from recovery_report import render

REPO = Path(__file__).resolve().parents[1]
FAST = ["--heartbeat-interval", "0.05", "--heartbeat-timeout", "0.25", "--context-tokens", "32",
        "--new-tokens", "6", "--fail-after", "3", "--repeats", "1"]
OPTIONS = ["--model-dir", "--devices", "--fail-device", "--fail-after", "--prompt", "--context-tokens",
           "--new-tokens", "--reassign", "--recovery", "--heartbeat-interval", "--heartbeat-timeout", "--dtype",
           "--repeats", "--report", "--seed", "--quiet", "--backend", "--detector", "--phi-threshold",
           "--standby-weights", "--fault", "--requests", "--prompts-file", "--max-num-batched-tokens",
           "--max-num-seqs", "--block-size", "--kv-cache-memory-bytes"]


def args(checkpoint: Path, report: Path, *extra: str) -> list[str]:
    return ["--model-dir", str(checkpoint), *FAST, "--report", str(report), *extra]


def load_json(report: Path) -> dict:
    return json.loads(demo.json_path(report).read_text())


def assert_every_row_lossless(saved: dict, names) -> None:
    rows = saved["comparison"]
    assert [r["name"] for r in rows] == list(names)
    for row in rows:
        assert row["error"] is None, row
        assert row["lossless"] and row["tokens_identical"] and row["verdict"] == "lossless", row
        assert row["near_tie_mismatches"] == [], row
        assert row["kept_heads_max_abs_diff"] == 0.0, row
        assert row["rebuilt_heads_max_rel_error"] <= row["rebuilt_heads_tolerance"], row
        assert row["logits_max_rel_diff"] <= row["logits_tolerance"], row
        assert row["continuation_ids"] == saved["text"]["reference_after_ids"], row
        assert row["interruption_s"] > row["median_s"] + saved["failure"]["detection_latency_s"], row


@pytest.fixture(scope="module")
def full_run(tiny_checkpoint, tmp_path_factory):
    """main() with every strategy, once for the module: (exit code, seconds, stdout, stderr, report path)."""
    report = tmp_path_factory.mktemp("demo-full") / "report.txt"
    capture = pytest.MonkeyPatch()
    out, err = io.StringIO(), io.StringIO()
    capture.setattr(sys, "stdout", out)
    capture.setattr(sys, "stderr", err)
    try:
        started = time.perf_counter()
        code = demo.main(args(tiny_checkpoint, report))
        seconds = time.perf_counter() - started
    finally:
        capture.undo()
    return code, seconds, out.getvalue(), err.getvalue(), report


def test_main_end_to_end_writes_both_files_and_every_strategy_is_lossless(full_run):
    code, seconds, stdout, _, report = full_run
    assert code == 0
    assert seconds < 20, f"took {seconds:.1f} s"
    assert report.is_file() and demo.json_path(report).is_file()
    saved = load_json(report)
    assert_every_row_lossless(saved, STRATEGIES)
    assert saved["failure"]["device"] == 1 and saved["failure"]["after_tokens"] == 3
    assert saved["text"]["before_ids"] == saved["text"]["reference_ids"][:3]
    assert report.read_text() in stdout  # the whole report is printed
    assert str(report) in stdout.splitlines()[-1]


def test_quiet_prints_only_the_interruption_the_rebuild_table_and_the_report_path(tiny_checkpoint, tmp_path, capsys):
    report = tmp_path / "quiet.txt"
    assert demo.main(args(tiny_checkpoint, report, "--quiet")) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = [line for line in out.splitlines() if line.strip()]
    assert "What losing Device-1 cost" in lines[0]
    assert lines[-1].startswith("report: ") and str(report) in lines[-1] and str(demo.json_path(report)) in lines[-1]
    for absent in ("Model loading", "System initialisation", "Failure detection", "Environment", "Generated text"):
        assert absent not in out
    # the full report's first screen and its rebuild section, as they are there, then the path line
    rendered = [line for line in render(load_json(report)).splitlines() if line.strip()]
    first = next(i for i, line in enumerate(rendered) if "What losing" in line)
    rebuild = next(i for i, line in enumerate(rendered) if line.startswith("4. KV-cache rebuild"))
    model = next(i for i, line in enumerate(rendered) if "Model loading" in line)
    rows = [line for line in lines if line.split(" ")[0] in STRATEGIES]
    assert [r.split()[0] for r in rows] == list(STRATEGIES) * 2
    assert lines[:-1] == rendered[first:model] + rendered[rebuild:rebuild + len(lines) - 1 - (model - first)]
    following = rendered[rebuild + len(lines) - 1 - (model - first)]
    assert following[0].isdigit() and "Device-level" in following  # the table section ended there


def test_one_recovery_strategy(tiny_checkpoint, tmp_path, capsys):
    report = tmp_path / "one.txt"
    assert demo.main(args(tiny_checkpoint, report, "--recovery", "reuse-hidden", "--quiet")) == 0
    saved = load_json(report)
    assert_every_row_lossless(saved, ["reuse-hidden"])
    assert saved["comparison"][0]["speedup"] is None  # no baseline was run, so no ratio is printed
    assert list(saved["text"]["after_ids"]) == ["reuse-hidden"]


def test_balanced_reassignment(tiny_checkpoint, tmp_path, capsys):
    report = tmp_path / "balanced.txt"
    assert demo.main(args(tiny_checkpoint, report, "--reassign", "balanced", "--quiet")) == 0
    saved = load_json(report)
    assert saved["failure"]["reassign"] == "balanced"
    assert "balanced" in saved["failure"]["plan"][0]
    assert_every_row_lossless(saved, STRATEGIES)


def test_every_strategy_is_lossless_with_a_prompt_that_does_not_repeat_one_token(tiny_checkpoint, tmp_path, capsys):
    """The default prompt makes the tiny model repeat one token, which hides a continuation started at the
    wrong position; 'abc' does not."""
    report = tmp_path / "abc.txt"
    assert demo.main(args(tiny_checkpoint, report, "--prompt", "abc", "--quiet")) == 0
    saved = load_json(report)
    assert len(set(saved["text"]["reference_after_ids"])) > 1, "the continuation must not be one repeated token"
    assert_every_row_lossless(saved, STRATEGIES)


def test_a_bfloat16_run_is_lossless_within_the_bfloat16_bounds(tiny_checkpoint, tmp_path, capsys):
    report = tmp_path / "bf16.txt"
    assert demo.main(args(tiny_checkpoint, report, "--dtype", "bfloat16", "--quiet")) == 0
    saved = load_json(report)
    for row in saved["comparison"]:
        assert row["lossless"], row["verdict"]
        assert row["kept_heads_max_abs_diff"] == 0.0  # kept KV is the same bits in any dtype
        assert row["rebuilt_heads_tolerance"] == REBUILT_KV_TOLERANCE[torch.bfloat16]
        assert row["logits_tolerance"] == LOGITS_TOLERANCE[torch.bfloat16]
    assert saved["model"]["compute_dtype"] == "bfloat16"


def test_help_mentions_every_option(capsys):
    try:
        code = demo.main(["--help"])
    except SystemExit as stop:
        code = stop.code
    assert code in (0, None)
    out = capsys.readouterr().out
    missing = [option for option in OPTIONS if option not in out]
    assert not missing, f"--help does not mention {missing}"


def test_subprocess_run_exits_zero_and_prints_the_report_path(tiny_checkpoint, tmp_path):
    report = tmp_path / "sub.txt"
    result = subprocess.run([sys.executable, "execution_optimization_algorithm_demo.py",
                             *args(tiny_checkpoint, report)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(report) in result.stdout.splitlines()[-1]
    assert report.is_file() and demo.json_path(report).is_file()


def test_a_wedged_device_is_declared_by_its_lack_of_progress_and_the_report_says_so(tiny_checkpoint, tmp_path, capsys):
    report = tmp_path / "wedge.txt"
    assert demo.main(args(tiny_checkpoint, report, "--fault", "wedge", "--recovery", "reuse-replay", "--quiet")) == 0
    saved = load_json(report)
    failure = saved["failure"]
    assert (failure["mode"], failure["declared_by"], failure["stuck_in"]) == ("wedge", "no-progress", "Forward")
    assert failure["signal"] is None  # a blocked thread, no signal
    assert_every_row_lossless(saved, ["reuse-replay"])
    text = report.read_text()
    assert "Device-1 wedged in the middle of the step" in text
    assert "its lack of progress (it beat on, but its compute was stuck in Forward); the fault was a really " \
           "blocked compute thread (no signal)" in text


def test_a_run_abandoned_by_what_was_not_injected_says_what_happened(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """Not every StepAbandoned is a missed heartbeat: the demo names the device, the evidence and the
    command, or the wait that stalled."""
    import demo_scenario
    from cluster_leader import FailureEvent, StepFailed
    from device_network import WaitStalled
    from heartbeat_detection import Detection
    wedged = FailureEvent(2, Detection(2, 1.0, 2.0, 3, "no-progress", "Rebuild"), 0)
    silent = FailureEvent(3, Detection(3, 1.0, 2.0, 4), 0)
    explained = demo_scenario.explain_abandoned(StepFailed([wedged, silent]))
    assert "Device-2 was declared dead because it beat on but made no progress in Rebuild" in explained
    assert "Device-3 was declared dead because it missed its heartbeats" in explained
    stalled = WaitStalled("the leader, Device-0, waited 1.5 s on Device-2 in Forward: no progress")

    def stalls(options, log):
        raise stalled
    monkeypatch.setattr(demo_scenario, "run_scenario", stalls)
    assert demo.main(args(tiny_checkpoint, tmp_path / "stalled.txt")) == 1
    err = capsys.readouterr().err
    assert f"error: a wait stalled: {stalled}; no report written" in err and "heartbeats" not in err


# --------------------------------------------------------------------------------------------
# Many requests in flight (--requests N)

# Prompts of 32, 24, 16 and 8 tokens, 4-position blocks, a budget of 20 blocks per device keeping every
# strategy's state (9216 bytes a block on the tiny preset in fp32; 10752 on the heir after the failure, 17
# blocks): three requests run when the failure strikes, the step it abandons preempts the newest, and the
# longest fits alone before and after
BATCH = ["--requests", "4", "--prompt", "abc", "--block-size", "4", "--kv-cache-memory-bytes", str(20 * 9216)]
REQUEST_FIELDS = {"request", "joins_at_step", "prompt", "prompt_ids", "new_tokens", "before_ids", "before_text",
                  "reference_ids", "reference_text", "reference_after_ids", "after_ids", "after_texts", "lossless"}


@pytest.fixture(scope="module")
def batch_run(tiny_checkpoint, tmp_path_factory):
    """main() with four requests and every strategy, once for the module: (exit code, stdout, report path)."""
    report = tmp_path_factory.mktemp("demo-batch") / "batch.txt"
    capture = pytest.MonkeyPatch()
    out = io.StringIO()
    capture.setattr(sys, "stdout", out)
    capture.setattr(sys, "stderr", io.StringIO())
    try:
        code = demo.main(args(tiny_checkpoint, report, *BATCH))
    finally:
        capture.undo()
    return code, out.getvalue(), report


def assert_every_request_lossless(saved: dict, names) -> None:
    assert [row["name"] for row in saved["comparison"]] == list(names)
    for row in saved["comparison"]:
        assert row["error"] is None and row["lossless"] and row["verdict"] == "lossless", row
        assert row["tokens_identical"] and row["near_tie_requests"] == [], row
        assert row["kept_heads_max_abs_diff"] == 0.0, row
        assert row["rebuilt_heads_max_rel_error"] <= row["rebuilt_heads_tolerance"], row
        assert row["requests_lossless"] == len(saved["requests"]) and row["requests_kv_checked"] >= 2, row
        assert row["interruption_s"] == pytest.approx(sum(row["interruption_phases"].values()))
    for request in saved["requests"]:
        assert REQUEST_FIELDS <= set(request), request
        assert set(request["after_ids"]) == set(names) and all(request["lossless"].values()), request
        for name, after in request["after_ids"].items():
            assert request["before_ids"] + after == request["reference_ids"], (name, request)


def test_many_requests_join_at_different_steps_and_every_strategy_keeps_every_one_lossless(batch_run):
    code, stdout, report = batch_run
    assert code == 0
    saved = load_json(report)
    assert_every_request_lossless(saved, STRATEGIES)
    requests = saved["requests"]
    assert [r["joins_at_step"] for r in requests] == [0, 1, 2, 3]
    assert len({len(r["prompt_ids"]) for r in requests}) == 4 and len({r["new_tokens"] for r in requests}) > 1
    assert requests[0]["new_tokens"] == 6 and all(len(r["prompt_ids"]) < len(requests[0]["prompt_ids"])
                                                  for r in requests[1:])
    batch = saved["batch"]
    assert batch["running_at_failure"] >= 2, "the failure strikes with several requests in flight"
    assert batch["kv_blocks_in_flight"] > 0 and batch["scheduling"]["block_size"] == 4
    assert batch["reference_preemptions"] > 0, "the budget was sized so that the scheduler preempts"
    failure = saved["failure"]
    assert (failure["after_steps"], failure["after_tokens"], failure["running"]) == (3, None, batch["running_at_failure"])
    assert failure["seen_in"] == "the first full-recompute run"
    rows = {row["name"]: row for row in saved["comparison"]}
    assert rows["full-recompute"]["capacity_requests"] >= rows["replicate"]["capacity_requests"] \
        >= rows["reuse-hidden"]["capacity_requests"] >= 1  # keeping state costs capacity
    assert all(row["preemptions"][0] >= batch["reference_preemptions"] for row in rows.values())
    assert report.read_text() in stdout
    for request in requests:  # one line per request in the table, its verdict per strategy
        assert any(line.split()[:4] == [str(request["request"]), str(request["joins_at_step"]),
                                        str(len(request["prompt_ids"])), str(len(request["reference_ids"]))]
                   and line.split()[4:] == ["yes"] * len(STRATEGIES) for line in stdout.splitlines())


def test_many_requests_quiet_with_a_prompts_file_prints_the_interruption_and_the_batch_table(
        tiny_checkpoint, tmp_path, capsys):
    report, prompts = tmp_path / "batch-quiet.txt", tmp_path / "prompts.txt"
    prompts.write_text("first other prompt\n\nsecond\n")
    assert demo.main(args(tiny_checkpoint, report, "--requests", "4", "--prompts-file", str(prompts),
                          "--recovery", "reuse-hidden", "--quiet")) == 0
    out = capsys.readouterr().out
    assert "to the next step of the batch" in out and "4. Many requests" in out and "Environment" not in out
    saved = load_json(report)
    assert [r["prompt"] for r in saved["requests"][1:]] == ["first other prompt", "second", "first other prompt"]
    assert_every_request_lossless(saved, ["reuse-hidden"])


def test_a_batch_request_differing_only_from_a_near_tie_on_is_lossless_counted_and_marked_tie():
    identical, tie = RequestCheck(None, None), RequestCheck(Divergence(4, 0.001, 0.002), None)
    defect = RequestCheck(Divergence(2, 0.5, 0.002), None)
    assert tie.lossless and not tie.tokens_identical and not defect.lossless
    assert verdict([[identical, tie]]) == "lossless, 1 request run(s) differing from a near-tie of the failure-free run on"
    assert verdict([[identical, tie], [defect, identical]]) == \
        "request 1's tokens differ from the failure-free run's at its token 3, not a near-tie"
    assert near_tie_requests([[identical, tie]]) == [{"run": 1, "request": 2, "first_divergent_token": 5,
                                                      "margin": 0.001, "bound": 0.002}]
    request = {"lossless": {"replicate": True, "full-recompute": True, "reuse-replay": False},
               "near_tie": {"replicate": True, "full-recompute": False, "reuse-replay": False}}
    assert [request_verdict(request, name) for name in request["lossless"]] == ["tie", "yes", "NO"]


@pytest.mark.slow
def test_many_requests_on_device_processes(tiny_checkpoint, tmp_path):
    report = tmp_path / "batch-processes.txt"
    result = subprocess.run([sys.executable, "execution_optimization_algorithm_demo.py",
                             *args(tiny_checkpoint, report, "--requests", "3", "--backend", "processes",
                                   "--recovery", "replicate", "--quiet")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    saved = load_json(report)
    assert saved["failure"]["signal"] == "SIGKILL"
    assert_every_request_lossless(saved, ["replicate"])
