"""The whole interruption, from a failure to the next token: inheriting without copying, standby
slices, the phi-accrual detector on a real cluster (and no false alarm under load), and the demo's
phases."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster_leader import StepFailed
from device_protocol import RecoveryPolicy
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama, prefill_under_load
from head_assignment import even_assignment
from heartbeat_detection import HeartbeatConfig
from llama_model_loader import Checkpoint
from task_reassign import STRATEGIES as REASSIGN_STRATEGIES, make_strategy
from tensor_parallel_model import extend_shard, load_device_shard, load_vocab_slice, missing_ranges

REPO = Path(__file__).resolve().parents[1]
PROMPT = list(range(5, 29))
FAST = HeartbeatConfig(interval_s=0.05, timeout_s=1.0)


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


# --------------------------------------------------------------------------------------------
# Inheriting writes only the new slices


def test_inheriting_adds_blocks_and_never_copies_what_the_device_held(tiny_checkpoint):
    checkpoint = Checkpoint(tiny_checkpoint)
    before = even_assignment(checkpoint.config, 4)
    plan = make_strategy("balanced").plan(before, 1)
    after, receiver = plan.after, next(iter(plan.moved_heads))
    shard = load_device_shard(checkpoint, before, receiver, torch.float32)
    heads = [h for h in after.heads[receiver] if h not in shard.query_heads]
    columns = missing_ranges(after.mlp[receiver], shard.mlp)
    extended = extend_shard(shard, checkpoint, heads, columns, torch.float32)
    assert extended.query_heads == shard.query_heads + tuple(heads) and heads
    for old, new in zip(shard.layers, extended.layers):
        assert new.wqkv is old.wqkv and new.wo is old.wo and new.w_down is old.w_down  # the held block, untouched
        assert len(new.inherited) == 1 and new.inherited[0].heads(checkpoint.config.head_dim)[0] == len(heads)
    assert extended.nbytes - shard.nbytes == sum(layer.inherited[0].block_nbytes for layer in extended.layers)

    vocab = load_vocab_slice(checkpoint, before.vocab_range(receiver, checkpoint.config.vocab_size), torch.float32)
    rows = after.vocab_range(receiver, checkpoint.config.vocab_size)
    grown = load_vocab_slice(checkpoint, rows, torch.float32, held=vocab)
    assert grown.rows == rows and [b.start for b in grown.blocks] == sorted(b.start for b in grown.blocks)
    assert sum(b.embed.shape[0] for b in grown.blocks) == rows[1] - rows[0]
    kept = [b for b in grown.blocks if storage(b.embed) == storage(vocab.blocks[0].embed)]
    assert kept, "the rows the device held are kept as views, not copied"


# --------------------------------------------------------------------------------------------
# Standby slices: read before the failure, so inheriting reads nothing


def run_to_recovery(checkpoint: Path, reassign: str, fail_device: int, standby: bool, backend: str = "threads"):
    """Prefill, a crash of `fail_device`, a held recovery (replicate), two more tokens."""
    model = FaultTolerantLlama.load(checkpoint, devices=4, log=lambda message: None, heartbeat=FAST,
                                    policy=RecoveryPolicy(reassign, 0, hold=True, standby_weights=standby),
                                    backend=backend)
    try:
        standby_bytes = {d: info.standby_bytes for d, info in model.describe().items()}
        model.keep(False, True)
        tokens = [int(model.prefill(PROMPT).argmax())]
        model.arm(FailurePlan(fail_device, after_tokens=1))
        with pytest.raises(StepFailed):
            model.decode(tokens[-1])
        post = model.prepare_recovery()
        model.rebuild("replicate")
        for _ in range(2):
            tokens.append(int(model.decode(tokens[-1]).argmax()))
        left = {d: info.standby_bytes for d, info in model.describe().items()}
        return tokens, post, standby_bytes, left
    finally:
        model.close()


@pytest.mark.parametrize("reassign", REASSIGN_STRATEGIES)
@pytest.mark.parametrize("fail_device", [0, 1, 3])
def test_standby_slices_make_inheriting_read_nothing_and_change_no_token(tiny_checkpoint, reassign, fail_device):
    tokens, post, _, _ = run_to_recovery(tiny_checkpoint, reassign, fail_device, standby=False)
    standby_tokens, standby_post, held, left = run_to_recovery(tiny_checkpoint, reassign, fail_device, standby=True)
    assert standby_tokens == tokens
    assert standby_post.assignment == post.assignment and standby_post.weight_bytes == post.weight_bytes > 0
    assert standby_post.weights_from_standby and not post.weights_from_standby
    assert all(held[d] > 0 for d in held if d in post.plans[-1].moved_heads)  # the memory it costs, reported
    assert all(bytes_ == 0 for bytes_ in left.values())  # given back once the failure it was read for came


def test_standby_slices_on_device_processes(tiny_checkpoint):
    tokens, post, _, _ = run_to_recovery(tiny_checkpoint, "random", 1, standby=False, backend="processes")
    standby_tokens, standby_post, _, _ = run_to_recovery(tiny_checkpoint, "random", 1, standby=True,
                                                         backend="processes")
    assert standby_tokens == tokens and standby_post.weights_from_standby


# --------------------------------------------------------------------------------------------
# Redo less: the abandoned step resumes where the survivors stopped


def tokens_after_a_crash(checkpoint: Path, backend: str, at_call: int | None, strategy: str):
    """Three tokens, Device-1 crashing at its `at_call`-th collective call of the second step; the
    held recovery with `strategy`; and the layer each survivor recorded it could resume from."""
    policy = RecoveryPolicy("random", 0, hold=True)
    with FaultTolerantLlama.load(checkpoint, devices=4, log=lambda message: None, heartbeat=FAST, policy=policy,
                                 backend=backend) as model:
        model.keep(True, True)
        tokens = [int(model.prefill(PROMPT).argmax())]
        model.arm(FailurePlan(1, after_tokens=1, at_call=at_call))
        with pytest.raises(StepFailed):
            model.decode(tokens[-1])
        post = model.prepare_recovery()
        model.rebuild(strategy)
        for _ in range(3):
            tokens.append(int(model.decode(tokens[-1]).argmax()))
        return tokens, {d: info.abandoned_step for d, info in post.survivors.items()}, model.resumed_steps


@pytest.fixture(scope="module")
def failure_free_tokens(tiny_checkpoint) -> list[int]:
    with FaultTolerantLlama.load(tiny_checkpoint, devices=4, log=lambda message: None, heartbeat=FAST) as model:
        tokens = [int(model.prefill(PROMPT).argmax())]
        for _ in range(3):
            tokens.append(int(model.decode(tokens[-1]).argmax()))
        return tokens


@pytest.mark.parametrize("backend", ["threads", "processes"])
@pytest.mark.parametrize("at_call, layer", [(1, None), (3, 0), (6, 2), (8, 2)])  # 1: the embedding's sum
@pytest.mark.parametrize("strategy", ["full-recompute", "replicate"])
def test_the_abandoned_step_resumes_from_the_layer_the_survivors_reached(tiny_checkpoint, failure_free_tokens,
                                                                         backend, at_call, layer, strategy):
    """Calls of a decode step on the 3-layer preset: 1 the embedding's all-reduce, then two per
    layer (attention, MLP), then the logits' gather (8): the survivors stop in the call the dead
    device never joined, and the redo starts from that layer (None: nothing to keep, redone whole)."""
    tokens, abandoned, resumed = tokens_after_a_crash(tiny_checkpoint, backend, at_call, strategy)
    assert tokens == failure_free_tokens
    start = len(PROMPT)
    expected = None if layer is None else (start, (failure_free_tokens[0],), layer)
    assert set(abandoned.values()) == {expected}
    assert resumed == ([] if layer is None else [(start, layer)])  # and the leader did resume it there


# --------------------------------------------------------------------------------------------
# The phi-accrual detector on a real cluster


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_phi_declares_a_hung_device_in_well_under_half_the_fixed_timeout(tiny_checkpoint, backend):
    heartbeat = HeartbeatConfig(interval_s=0.1, timeout_s=5.0, detector="phi")
    with FaultTolerantLlama.load(tiny_checkpoint, devices=3, log=lambda message: None, heartbeat=heartbeat,
                                 policy=RecoveryPolicy(hold=True), backend=backend) as model:
        token = int(model.prefill(PROMPT).argmax())
        model.arm(FailurePlan(2, after_tokens=1, mode="hang"))
        with pytest.raises(StepFailed) as failure:
            model.decode(token)
        (event,) = failure.value.events
        assert event.device == 2 and event.detection.signal == "heartbeat"
        assert model.detection_latency_s(event) < heartbeat.timeout_s / 2  # steady beats: about 0.2-0.3 s
        model.release_hung()


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_phi_raises_no_false_alarm_while_every_core_is_busy(tiny_checkpoint, backend):
    """Ten heartbeat windows of the default interval with both cores burnt by two extra processes and
    the devices prefilling a long context over and over: nobody is declared dead."""
    heartbeat = HeartbeatConfig(interval_s=1.0, timeout_s=5.0, detector="phi")
    context = list(range(5, 5 + 300))
    with FaultTolerantLlama.load(tiny_checkpoint, devices=4, log=lambda message: None, heartbeat=heartbeat,
                                 policy=RecoveryPolicy(hold=True), backend=backend) as model:
        declared, prefills = prefill_under_load(model, context, 10 * heartbeat.interval_s)
        assert prefills > 1
        assert declared == 0
        assert not [event for event in model.events if event[2] == "declared dead"]


# --------------------------------------------------------------------------------------------
# The demo reports every phase


def test_demo_with_phi_and_standby_reports_each_phase_of_the_interruption(tiny_checkpoint, tmp_path):
    report = tmp_path / "report.txt"
    completed = subprocess.run(
        [sys.executable, str(REPO / "execution_optimization_algorithm_demo.py"), "--model-dir", str(tiny_checkpoint),
         "--heartbeat-interval", "0.1", "--context-tokens", "32", "--new-tokens", "6", "--fail-after", "3",
         "--repeats", "1", "--detector", "phi", "--phi-threshold", "6", "--standby-weights", "--report", str(report),
         "--quiet"], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    saved = json.loads(report.with_suffix(".json").read_text())
    failure = saved["failure"]
    assert failure["detector"] == "phi" and failure["phi_threshold"] == 6.0
    assert failure["detection_latency_s"] < failure["heartbeat_timeout_s"]  # the fixed 5 s was not waited for
    assert failure["weights_from_standby"] and failure["regroup_seconds"] >= 0
    assert any(d["standby_bytes"] > 0 for d in saved["system"]["assignment"])
    assert saved["system"]["copy_bandwidth"]["fresh_bytes_per_s"] > 0
    for row in saved["comparison"]:
        phases = row["interruption_phases"]
        assert row["interruption_s"] == pytest.approx(sum(phases.values()))
        assert phases["detection_s"] == failure["detection_latency_s"] and phases["redo_s"] > 0
    assert "What losing Device-1 cost" in completed.stdout


@pytest.mark.parametrize("bad, message", [
    (["--detector", "gossip"], "invalid choice"),
    (["--detector", "phi", "--phi-threshold", "0"], "phi threshold"),
])
def test_demo_refuses_a_bad_detector_in_one_line(tiny_checkpoint, tmp_path, bad, message):
    completed = subprocess.run(
        [sys.executable, str(REPO / "execution_optimization_algorithm_demo.py"), "--model-dir", str(tiny_checkpoint),
         "--report", str(tmp_path / "r.txt"), *bad], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and completed.stderr.count("\n") == 1 and message in completed.stderr
