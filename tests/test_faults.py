"""Faults the cluster must survive losslessly, on the tiny presets and on both backends.

Every scenario runs the same model twice: a failure-free reference (tokens, and every device's KV
as the devices report it), then the same generation with injected faults, the leader holding each
failure until the test's driver recovers it. After every recovery the cluster is checked at once,
through messages only (each query head has one owner; each owner holds every KV head it needs,
with the whole context, each head within REBUILT_KV_TOLERANCE of its own scale in the reference's
prefix); at the end the tokens must be identical and every head of the KV pass the same per-head
check. Heartbeats are short (0.05 s interval, 0.5 s timeout), so a detection costs half of
a second. The `backend` fixture runs each scenario on device threads and again with every message
and payload serialised to bytes (`-k serialising` selects those).
"""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import execution_optimization_algorithm_demo as demo
from cluster_leader import Recovery, StepFailed
from device_network import StepAbandoned, WaitStalled
from device_protocol import DRIVER, Address, Chunk, Describe, Envelope, Forward, RecoveryPolicy, Regroup, SendTo
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama, generate_with_failures
from head_assignment import Assignment, custom_assignment, even_assignment
from heartbeat_detection import HeartbeatConfig
from kv_cache_reused import STRATEGIES as RECOVERY_STRATEGIES
from llama_model_loader import Checkpoint
from lossless_checks import REBUILT_KV_TOLERANCE, KVCheck, check_kv, reference_head, relative_error
from polling import wait_until
from process_launcher import process_exists
from task_reassign import STRATEGIES as REASSIGN_STRATEGIES
from tensor_parallel_cluster import ClusterClosed
from tensor_parallel_model import SEQUENCE_PARALLEL_MIN_TOKENS

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT = HeartbeatConfig(interval_s=0.05, timeout_s=0.5)  # short, with room for a loaded 2-core machine
PROCESSES_HEARTBEAT = HeartbeatConfig(interval_s=0.05, timeout_s=1.0)  # five interpreters share the two cores
PROMPT = list(range(5, 29))  # 24 byte tokens
LONG_PROMPT = list(range(5, 5 + 40))  # 40 tokens: prefill and full recompute run sequence-parallel
NEW_TOKENS = 6
DTYPE = torch.float32
TOLERANCE = REBUILT_KV_TOLERANCE[DTYPE]
PROJECT_THREADS = ("Device-",)


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


def project_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(PROJECT_THREADS)]


def assert_no_project_threads(grace_s: float = 2.0) -> None:
    """No device thread is left (explicitly, beside the conftest guard)."""
    wait_until(lambda: not project_threads(), grace_s)
    assert project_threads() == [], f"threads left running: {project_threads()}"


def new_model(checkpoint: Checkpoint, assignment: Assignment, backend: str, recovery: str = "full-recompute",
              reassign: str = "random", seed: int = 0, heartbeat: HeartbeatConfig | None = None,
              fence: bool = True) -> FaultTolerantLlama:
    """A cluster whose leader holds every failure for the test to recover."""
    return FaultTolerantLlama(checkpoint, assignment, DTYPE, heartbeat=heartbeat or heartbeat_for(backend),
                              backend=backend,
                              policy=RecoveryPolicy(reassign, seed, recovery, hold=True, fence=fence))


def heartbeat_for(backend: str) -> HeartbeatConfig:
    return PROCESSES_HEARTBEAT if backend == "processes" else HEARTBEAT


def device_running(model: FaultTolerantLlama, device: int) -> bool:
    """Is the device still there (its threads, or its process)?"""
    if model.backend == "processes":
        return device not in model.transport.exits
    return f"Device-{device}" in project_threads()


@dataclass
class Outcome:
    reference: list[int]
    tokens: list[int]
    recoveries: list[Recovery]
    kv: KVCheck
    assignment: Assignment
    leader: int
    seconds: float
    events: list[tuple[float, int, str, float]] = field(default_factory=list)
    failures: list = field(default_factory=list)  # every failure the driver was told of

    @property
    def failure_events(self):
        return [e for r in self.recoveries for e in r.events]

    @property
    def failed_devices(self) -> set[int]:
        return {e.device for e in self.failures}

    def kinds(self, device: int) -> list[str]:
        return [kind for _, d, kind, _ in self.events if d == device]

    def assert_lossless(self) -> None:
        assert self.tokens == self.reference, "tokens differ from the failure-free run"
        assert self.kv.ok, self.kv.describe()


def check_recovered_state(model: FaultTolerantLlama, reference_kv) -> None:
    """Right after a recovery, asking the devices: one owner per query head, every needed KV head held
    for the whole context and, head by head, equal to the failure-free run's within its own scale."""
    config, assignment = model.config, model.assignment
    owners = sorted(h for heads in assignment.heads.values() for h in heads)
    assert owners == list(range(config.num_attention_heads)), f"query heads owned {owners}"
    infos, snapshot, length = model.describe(), model.kv_snapshot(), model.position
    assert set(infos) == set(assignment.devices)
    for device, info in infos.items():
        assert set(info.query_heads) == set(assignment.heads[device])
        assert set(assignment.kv_heads(device)) <= set(info.kv_heads), f"Device-{device} lacks KV heads"
        assert len(info.cached_ids) == length, f"Device-{device} caches {len(info.cached_ids)} of {length} positions"
        for layer in range(config.num_hidden_layers):
            for g in assignment.kv_heads(device):
                for got, want in zip(snapshot[(device, layer, g)], reference_head(reference_kv, device, layer, g)):
                    assert got.shape == (length, config.head_dim)
                    error = relative_error(got, want[:length])
                    assert error <= TOLERANCE, (
                        f"Device-{device} layer {layer} KV head {g}: rebuilt KV off by {error:.3g} of its scale")


_REFERENCES: dict[tuple, tuple[list[int], dict]] = {}


def failure_free(checkpoint: Checkpoint, assignment: Assignment, new_tokens: int,
                 prompt: Sequence[int] = PROMPT) -> tuple[list[int], dict]:
    """Tokens and every device's KV of a failure-free run (cached per assignment; on threads: the
    backends compute the same bits)."""
    key = (str(checkpoint.folder), tuple(assignment.heads.items()), new_tokens, tuple(prompt))
    if key not in _REFERENCES:
        with new_model(checkpoint, assignment, "threads") as model:
            _REFERENCES[key] = (model.generate(prompt, new_tokens), model.kv_snapshot())
    return _REFERENCES[key]


Hook = Callable[..., None]


def run_scenario(checkpoint: Checkpoint, assignment: Assignment, failures: Sequence[FailurePlan], backend: str, *,
                 recovery: str = "full-recompute", reassign: str = "random", seed: int = 0,
                 hidden: bool = False, replicate: bool = False, new_tokens: int = NEW_TOKENS,
                 prompt: Sequence[int] = PROMPT, before_recover: Hook | None = None,
                 after_recover: Hook | None = None, fence: bool = True,
                 heartbeat: HeartbeatConfig | None = None) -> Outcome:
    """The run with `failures` on a fresh model, every recovery checked as it happens, against a
    failure-free run of the same assignment."""
    reference, reference_kv = failure_free(checkpoint, assignment, new_tokens, prompt)
    with new_model(checkpoint, assignment, backend, recovery, reassign, seed, heartbeat, fence) as model:
        model.keep(hidden, replicate)
        recoveries: list[Recovery] = []

        def recover(m: FaultTolerantLlama, failure: StepFailed) -> None:
            if before_recover:
                before_recover(m, failure)
            result = m.recover(recovery)
            recoveries.append(result)
            check_recovered_state(m, reference_kv)
            if after_recover:
                after_recover(m, failure, result)

        started = time.perf_counter()
        tokens = generate_with_failures(model, prompt, new_tokens, failures, recover)
        seconds = time.perf_counter() - started
        kv = check_kv(model.kv_snapshot(), reference_kv, frozenset(), DTYPE, model.position)  # recoveries: all bounded
        return Outcome(reference, tokens, recoveries, kv, model.assignment, model.leader, seconds,
                       list(model.events), list(model.failures))


# --------------------------------------------------------------------------------------------
# Each device in turn, the leader included


@pytest.mark.parametrize("device, recovery", [(0, "full-recompute"), (1, "reuse-replay"), (2, "reuse-hidden"),
                                              (3, "replicate")])
def test_each_device_crashing_in_turn_is_survived_losslessly(tiny, backend, device, recovery):
    outcome = run_scenario(tiny, even_assignment(tiny.config, 4), [FailurePlan(device, after_tokens=2)], backend,
                           recovery=recovery, hidden=recovery == "reuse-hidden", replicate=recovery == "replicate")
    outcome.assert_lossless()
    (rec,) = outcome.recoveries
    assert [e.device for e in rec.events] == [device]
    assert rec.strategy == recovery and rec.fallback_reason is None and rec.attempts == 1
    expected_leader = 1 if device == 0 else 0  # the lowest-numbered survivor
    assert rec.events[0].leader == expected_leader
    assert outcome.leader == expected_leader
    assert device not in outcome.assignment.devices and len(outcome.assignment.devices) == 3
    assert_declared_as_the_backend_can(rec.events[0].detection, backend)
    assert_no_project_threads()


def assert_declared_as_the_backend_can(detection, backend: str) -> None:
    """On threads a crash is known only by its silence; a SIGKILLed process at once, by its exit or
    by its peers' failed collective, long before a heartbeat timeout."""
    timeout_s = heartbeat_for(backend).timeout_s
    if backend == "processes":
        assert detection.signal in ("process-exit", "collective")
        assert detection.silence_s < timeout_s
    else:
        assert detection.signal == "heartbeat"
        assert detection.silence_s > timeout_s  # declared by timeout, not earlier


def test_an_error_that_stops_the_new_leaders_recovery_reaches_the_driver_at_once(tiny, monkeypatch):
    """Device-0 leads and dies; Device-1 leads the recovery on its own, which fails with an error that
    is no device's death (planted: the rebuild cannot be planned). The driver raises that error, not
    a silence of the leader after seconds (the new leader's thread must not end without a word)."""
    import cluster_leader

    def unplannable(*args, **kwargs):
        raise ValueError("planted: the rebuild cannot be planned")
    monkeypatch.setattr(cluster_leader, "plan_rebuild", unplannable)
    with FaultTolerantLlama(tiny, even_assignment(tiny.config, 4), DTYPE, heartbeat=HEARTBEAT,
                            policy=RecoveryPolicy("balanced", 0, "full-recompute")) as model:
        with pytest.raises(ValueError, match="planted: the rebuild cannot be planned"):
            generate_with_failures(model, PROMPT, NEW_TOKENS, [FailurePlan(0, after_tokens=2)])
        assert model.leader == 1
    assert_no_project_threads()


def test_the_leader_crashing_mid_step_is_declared_by_the_lowest_survivor_which_leads_the_recovery(tiny, backend):
    """Device-0 leads and dies in the middle of a step: every device watches it; Device-1, the lowest
    survivor, declares it, leads the recovery (its own, not held), and generation goes on lossless."""
    assignment = even_assignment(tiny.config, 4)
    reference, reference_kv = failure_free(tiny, assignment, NEW_TOKENS)
    with FaultTolerantLlama(tiny, assignment, DTYPE, heartbeat=heartbeat_for(backend), backend=backend,
                            policy=RecoveryPolicy("balanced", 0, "reuse-hidden")) as model:
        model.keep(True, False)
        tokens = generate_with_failures(model, PROMPT, NEW_TOKENS, [FailurePlan(0, after_tokens=2)])
        assert model.leader == 1 and model.assignment.devices == (1, 2, 3)
        kv = check_kv(model.kv_snapshot(), reference_kv, frozenset(), DTYPE, model.position)
        events = list(model.events)
    assert tokens == reference and kv.ok, kv.describe()
    (rec,) = model.recoveries
    assert [(e.device, e.leader) for e in rec.events] == [(0, 1)]
    assert rec.strategy == "reuse-hidden" and rec.plans[0].strategy == "balanced"
    assert any(kind == "declared dead" and d == 0 for _, d, kind, _ in events)
    assert_no_project_threads()


def test_leader_failure_report_names_the_new_leader(tiny_checkpoint, tmp_path, capsys):
    report = tmp_path / "report.txt"
    code = demo.main(["--model-dir", str(tiny_checkpoint), "--devices", "4", "--fail-device", "0",
                      "--fail-after", "2", "--new-tokens", "4", "--context-tokens", "0", "--repeats", "1",
                      "--heartbeat-interval", "0.05", "--heartbeat-timeout", "0.25", "--quiet",
                      "--report", str(report)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(report.with_suffix(".json").read_text())
    assert data["failure"]["device"] == 0
    assert data["failure"]["leader"] == 1
    assert data["system"]["leader"] == 0
    assert re.search(r"^led by\s+Device-1$", report.read_text(), re.MULTILINE), "text report does not name Device-1"
    assert "0" not in {str(d) for d in data["failure"]["assignment_after"]}
    assert [row["lossless"] for row in data["comparison"]] == [True] * len(data["comparison"])
    assert_no_project_threads()


# --------------------------------------------------------------------------------------------
# Crash during prefill, decode, and recovery itself

# A step's collective calls: the embedding's sum first, then two per layer (attention, MLP); in a
# sequence-parallel prefill (32 tokens or more) each sum is a reduce-scatter followed by an
# all-gather of the normed rows: call 1 reduce-scatters the embedding, 2 all-gathers layer 0's
# input, 3 reduce-scatters its attention output.


@pytest.mark.parametrize("after_tokens", [0, 3], ids=["prefill", "decode"])
@pytest.mark.parametrize("recovery", ["full-recompute", "reuse-hidden"])
def test_crash_during_prefill_or_decode_is_survived_losslessly(tiny, backend, after_tokens, recovery):
    outcome = run_scenario(tiny, even_assignment(tiny.config, 4),
                           [FailurePlan(2, after_tokens=after_tokens, at_call=2)], backend,
                           recovery=recovery, hidden=recovery == "reuse-hidden")
    outcome.assert_lossless()
    (rec,) = outcome.recoveries
    assert rec.strategy == recovery and rec.fallback_reason is None
    assert [e.device for e in rec.events] == [2]
    assert 2 not in outcome.assignment.devices


@pytest.mark.parametrize("at_call", [3, 2], ids=["in-a-reduce-scatter", "in-an-all-gather"])
@pytest.mark.parametrize("recovery", ["full-recompute", "reuse-replay", "reuse-hidden"])
def test_crash_during_a_sequence_parallel_prefill_is_survived_losslessly(tiny, backend, at_call, recovery):
    """A long prompt's prefill, and the recompute after it, split the residual stream by rows."""
    assert len(LONG_PROMPT) >= SEQUENCE_PARALLEL_MIN_TOKENS
    outcome = run_scenario(tiny, even_assignment(tiny.config, 4), [FailurePlan(1, after_tokens=0, at_call=at_call)],
                           backend, recovery=recovery, hidden=recovery == "reuse-hidden", prompt=LONG_PROMPT,
                           new_tokens=3)
    outcome.assert_lossless()
    assert [e.device for e in outcome.failure_events] == [1]


@pytest.mark.parametrize("second, recovery", [
    (FailurePlan(2, after_tokens=3, during_recovery=True), "full-recompute"),
    (FailurePlan(2, after_tokens=3, during_recovery=True), "reuse-hidden"),
    (FailurePlan(2, after_tokens=3, during_recovery=True), "replicate"),
    # Device-2 makes 3 collective calls in the step Device-1 breaks (the embedding, layer 0's two),
    # so its 5th call is the 2nd of the full-recompute prefill: it dies while the KV is rebuilt
    (FailurePlan(2, after_tokens=3, at_call=5), "full-recompute"),
], ids=["while-inheriting-weights-full", "while-inheriting-weights-hidden", "while-inheriting-weights-replicate",
        "while-rebuilding-kv"])
def test_second_crash_during_recovery_restarts_it_on_what_is_left(tiny, backend, second, recovery):
    outcome = run_scenario(tiny, even_assignment(tiny.config, 4), [FailurePlan(1, after_tokens=3, at_call=2), second],
                           backend, recovery=recovery, hidden=recovery == "reuse-hidden",
                           replicate=recovery == "replicate")
    outcome.assert_lossless()
    (rec,) = outcome.recoveries
    assert rec.attempts >= 2, "the interrupted recovery was not started again"
    assert [e.device for e in rec.events] == [1, 2]
    assert [p.failed for p in rec.plans] == [1, 2]
    assert rec.plans[0].before.devices == (0, 1, 2, 3) and rec.plans[-1].after.devices == (0, 3)
    assert outcome.assignment.devices == (0, 3)
    assert all(e.leader == 0 for e in rec.events)


def test_crash_during_a_second_prefill_after_an_earlier_generation(tiny, backend):
    reference, _ = failure_free(tiny, even_assignment(tiny.config, 4), 4)
    with new_model(tiny, even_assignment(tiny.config, 4), backend, "reuse-hidden") as model:
        assert model.generate(PROMPT, 4) == reference  # an earlier request on the same cluster
        model.enable_hidden_states()  # hidden-state checkpoints switched on afterwards, as the demo does
        tokens = generate_with_failures(model, PROMPT, 4, [FailurePlan(2, after_tokens=0, at_call=2)])
    assert tokens == reference
    assert [(r.strategy, r.fallback_reason) for r in model.recoveries] == [("reuse-hidden", None)]


# --------------------------------------------------------------------------------------------
# Several devices lost one after another


@pytest.mark.parametrize("devices, failures, survivor, recovery, reassign", [
    (3, [FailurePlan(0, 1), FailurePlan(2, 3)], 1, "reuse-replay", "random"),
    (4, [FailurePlan(1, 1), FailurePlan(2, 2), FailurePlan(3, 4)], 0, "reuse-hidden", "balanced"),
    (4, [FailurePlan(0, 0), FailurePlan(3, 2), FailurePlan(1, 4)], 2, "replicate", "random"),
], ids=["two-lost-leader-first", "three-lost-hidden", "three-lost-replicate"])
def test_devices_lost_one_after_another_down_to_one_survivor(tiny, backend, devices, failures, survivor, recovery,
                                                             reassign):
    outcome = run_scenario(tiny, even_assignment(tiny.config, devices), failures, backend, recovery=recovery,
                           reassign=reassign, hidden=recovery == "reuse-hidden", replicate=recovery == "replicate")
    outcome.assert_lossless()
    assert len(outcome.recoveries) == len(failures)
    assert [e.device for e in outcome.failure_events] == [f.device for f in failures]
    assert outcome.assignment.devices == (survivor,)
    assert outcome.assignment.heads[survivor] == tuple(range(tiny.config.num_attention_heads))
    assert outcome.assignment.mlp[survivor] == ((0, tiny.config.intermediate_size),)
    assert outcome.leader == survivor
    assert outcome.recoveries[-1].events[0].leader == survivor
    assert_no_project_threads()


# --------------------------------------------------------------------------------------------
# Slow and hung devices


def test_slow_device_that_keeps_beating_is_not_declared_dead(tiny, backend):
    """A compute stall shorter than the no-progress limit (the timeout), but 20 beat intervals long:
    the device beats on through it, and its peers wait for it: nobody is declared."""
    delay = 1.0
    heartbeat = HeartbeatConfig(interval_s=0.05, timeout_s=2.0)
    outcome = run_scenario(tiny, even_assignment(tiny.config, 4),
                           [FailurePlan(2, after_tokens=2, mode="slow", delay_s=delay)], backend,
                           before_recover=lambda m, f: pytest.fail(f"a recovery was started for {f.events}"),
                           heartbeat=heartbeat)
    outcome.assert_lossless()
    assert outcome.recoveries == []
    assert "stalled" in outcome.kinds(2) and not any("died" in outcome.kinds(d) for d in range(4))
    assert outcome.seconds >= delay


@pytest.mark.parametrize("wakes", ["during-recovery", "after-recovery"])
def test_hung_device_that_wakes_is_fenced_out_by_its_epoch(tiny, backend, wakes):
    """A hung device (alive, silent, idle; a SIGSTOPped process) is declared dead, which opens an epoch
    it never joins. When it wakes (SIGCONT), during the recovery or after it, its stale step's
    collective call is refused (its group has ended), its stale answer is ignored, it finds itself
    fenced out and stops; the run is lossless. (The leader's SIGKILL is off here: the epoch alone
    must fence.)"""
    hung = 1
    seen: dict = {}

    def wake(model: FaultTolerantLlama) -> None:
        model.release_hung()
        seen["stopped"] = wait_until(lambda: not device_running(model, hung), timeout_s=5)

    def before_recover(model, failure):
        assert [e.device for e in failure.events] == [hung]
        assert device_running(model, hung), "the hung device should still be there, stuck"
        if wakes == "during-recovery":
            wake(model)

    def after_recover(model, failure, recovery):
        if wakes == "after-recovery":
            wake(model)

    outcome = run_scenario(tiny, even_assignment(tiny.config, 4),
                           [FailurePlan(hung, after_tokens=2, at_call=2, mode="hang")], backend,
                           recovery="reuse-hidden", hidden=True, before_recover=before_recover,
                           after_recover=after_recover, fence=False)
    outcome.assert_lossless()
    assert seen == {"stopped": True}, seen
    assert "fenced out" in outcome.kinds(hung)
    (rec,) = outcome.recoveries
    assert [e.device for e in rec.events] == [hung] and rec.events[0].detection.signal == "heartbeat"
    assert hung not in outcome.assignment.devices
    assert_no_project_threads()


def test_a_hung_process_declared_dead_is_killed_by_the_leader(tiny):
    """Fencing as clusters do it: the SIGSTOPped device is declared on its silence (the only signal a
    stopped process gives) and the leader SIGKILLs it; the run goes on lossless."""
    hung = 2
    exit_codes = {}

    def after_recover(model, failure, recovery):
        wait_until(lambda: not device_running(model, hung), timeout_s=5)
        exit_codes.update({d: code for d, (_, code) in model.transport.exits.items()})

    outcome = run_scenario(tiny, even_assignment(tiny.config, 4),
                           [FailurePlan(hung, after_tokens=2, at_call=2, mode="hang")], "processes",
                           recovery="replicate", replicate=True, after_recover=after_recover)
    outcome.assert_lossless()
    assert exit_codes == {hung: -signal.SIGKILL}
    (rec,) = outcome.recoveries
    assert rec.events[0].detection.signal == "heartbeat"
    assert rec.events[0].detection.silence_s > HEARTBEAT.timeout_s


def test_a_slow_fault_after_a_hung_device_was_released_still_stalls(tiny, backend):
    """Releasing a hung device must not release every later stall with it: each fault has its own."""
    delay = 0.25  # under the 0.5 s no-progress limit: the stalled leader is not declared
    with new_model(tiny, even_assignment(tiny.config, 4), backend) as model:
        tokens = generate_with_failures(model, PROMPT, 3, [FailurePlan(3, after_tokens=1, at_call=2, mode="hang")])
        model.release_hung()
        model.arm(FailurePlan(0, mode="slow", delay_s=delay, at_call=1))
        started = time.monotonic()
        model.decode(tokens[-1])
        assert time.monotonic() - started >= delay, "the stall was skipped"


def test_close_stops_every_device_at_once_even_while_the_leader_waits_for_a_detection(tiny, backend):
    """A device has crashed and the leader waits (30 s) for its silence to be judged: closing the
    cluster must not wait for that; every device obeys its Stop at once."""
    model = new_model(tiny, even_assignment(tiny.config, 4), backend,
                      heartbeat=HeartbeatConfig(interval_s=0.05, timeout_s=30.0))
    tokens = model.generate(PROMPT, 2)
    model.arm(FailurePlan(2, after_tokens=2, at_call=2))
    ended: list[BaseException] = []

    def step() -> None:
        try:
            model.decode(tokens[-1])
        except ClusterClosed as error:
            ended.append(error)

    stepping = threading.Thread(target=step, name="stepping", daemon=True)
    stepping.start()
    wait_until(lambda: bool(model.strikes), timeout_s=10)
    started = time.monotonic()
    model.close()
    stepping.join(timeout=2.0)
    assert time.monotonic() - started < 2.0
    assert not stepping.is_alive() and len(ended) == 1, "the step in flight must end with the cluster"
    assert_no_project_threads()


def test_the_device_level_comparison_ends_when_its_device_dies_instead_of_waiting_for_ever(tiny, backend):
    """The new owner hangs at the start of its rebuild from hidden states (silent, never answering): the
    comparison must end once the leader declares it dead, as a step does."""
    from performance_comparator import compare_device_level
    model = new_model(tiny, even_assignment(tiny.config, 4), backend, "reuse-hidden")
    result: dict = {}
    try:
        model.keep(True, False)
        logits = model.prefill(PROMPT)
        model.arm(FailurePlan(1, after_tokens=1))
        with pytest.raises(StepFailed):
            model.decode(int(logits.argmax()))
        post = model.prepare_recovery()
        (receiver,) = post.plans[-1].receivers
        model.arm(FailurePlan(receiver, mode="hang", during_recovery=True))

        def compare():
            try:
                compare_device_level(model, post, repeats=1)
            except BaseException as error:  # noqa: BLE001 - checked below
                result["error"] = error
        comparing = threading.Thread(target=compare, name="comparison", daemon=True)
        comparing.start()
        comparing.join(timeout=HEARTBEAT.timeout_s + HEARTBEAT.interval_s + 5)
        ended = not comparing.is_alive()
    finally:
        model.close()
    assert ended, "the comparison waited for ever on a dead device"
    assert isinstance(result.get("error"), StepAbandoned), result


def test_a_devices_own_error_is_reported_not_the_step_abandoned_its_peers_got(tiny, backend):
    """A device whose step raises a real error breaks the step for its peers: the driver must get that
    error (a programming error), never a peer's StepAbandoned, and the next step works (a new group)."""
    with new_model(tiny, even_assignment(tiny.config, 4), backend) as model:
        model.generate(PROMPT, 2)
        with pytest.raises(ValueError, match="would leave a gap"):
            model.forward([7], start=model.position + 3)  # Device-0 (and all) refuse a step past their context
        assert model.generate(PROMPT, 2) == failure_free(tiny, even_assignment(tiny.config, 4), 2)[0]


# --------------------------------------------------------------------------------------------
# Wedged devices (the compute blocked for good, the beats on), and every wait ending


@pytest.mark.parametrize("device, recovery", [(2, "full-recompute"), (0, "replicate")],
                         ids=["member-rebuilds", "leader-copies"])
def test_a_wedged_device_is_declared_for_its_lack_of_progress_and_recovered_losslessly(tiny, backend, device,
                                                                                       recovery):
    """The device's compute thread blocks before a collective call of a step while its control thread
    beats on: only its progress gives it away (its peers wait for it inside that call, one call
    ahead). It is declared by no-progress, stuck in its Forward, and fenced (processes: SIGKILL by
    the leader); a wedged leader is declared by the survivors that watch it, the lowest leads, and
    the old one steps down. Lossless."""
    exit_codes: dict[int, int] = {}

    def after_recover(model, failure, result):
        if backend == "processes":
            wait_until(lambda: not device_running(model, device), timeout_s=5)
            exit_codes.update({d: code for d, (_, code) in model.transport.exits.items()})

    outcome = run_scenario(tiny, even_assignment(tiny.config, 4), [FailurePlan(device, after_tokens=2, mode="wedge")],
                           backend, recovery=recovery, replicate=recovery == "replicate", after_recover=after_recover)
    outcome.assert_lossless()
    (rec,) = outcome.recoveries
    (event,) = rec.events
    assert (event.device, event.detection.signal, event.detection.stuck_in) == (device, "no-progress", "Forward")
    assert event.detection.silence_s > heartbeat_for(backend).timeout_s
    assert event.leader == outcome.leader == (1 if device == 0 else 0)
    assert rec.strategy == recovery and rec.fallback_reason is None
    assert "wedged" in outcome.kinds(device) and "beat" in outcome.kinds(device)
    if backend == "processes":
        assert exit_codes == {device: -signal.SIGKILL}
    else:  # it read the new epoch without it, and stepped down (a leader: no second one)
        assert "fenced out" in outcome.kinds(device)
    assert_no_project_threads()


SHORT = HeartbeatConfig(interval_s=0.05, timeout_s=0.2)  # waits end after SHORT.wait_limit_s = 0.6 s


def test_a_command_whose_epoch_never_comes_is_refused_after_the_wait_limit(tiny):
    """DeviceActor._await_epoch: a command stamped with an epoch whose news never arrives ends, naming
    the device, the sender and the command, instead of holding the compute thread."""
    with new_model(tiny, even_assignment(tiny.config, 4), "threads", heartbeat=SHORT) as model:
        started = time.monotonic()
        model.transport.send(Address("commands", 1), Envelope(DRIVER, model.epoch + 5, 1, Describe()))
        envelope = model.transport.receive(Address("results", DRIVER), timeout=SHORT.wait_limit_s + 5)
        waited = time.monotonic() - started
        assert envelope is not None, "the command was never answered"
        assert isinstance(envelope.body.error, WaitStalled), envelope.body
        assert re.search(r"Device-1 waited .* epoch 5 from Device--1 before serving Describe", str(envelope.body.error))
        assert SHORT.wait_limit_s <= waited < SHORT.wait_limit_s + 2
        assert len(model.describe()) == 4  # the device serves on


def test_a_lone_device_waiting_in_a_call_ends_the_leaders_wait_and_the_cluster_goes_on(tiny):
    """The leader's `_run_group`: Device-1 alone is sent a step and waits inside its first collective
    for peers that never come. Waiting inside a call, it is nobody's culprit (nobody is declared);
    the leader's wait ends after the wait limit, naming the device and the command, the driver gets
    that error, a new epoch releases Device-1, and generation goes on."""
    with new_model(tiny, even_assignment(tiny.config, 4), "threads", heartbeat=SHORT) as model:
        reference = model.generate(PROMPT, 2)
        started = time.monotonic()
        with pytest.raises(WaitStalled, match=r"the leader, Device-0, waited .* on Device-1 in Forward: no progress"):
            model.request(SendTo(1, Forward((Chunk(0, (5,), 0),))))
        assert SHORT.wait_limit_s <= time.monotonic() - started < SHORT.wait_limit_s + 2
        assert model.failures == [] and model.assignment.devices == (0, 1, 2, 3)
        assert model.generate(PROMPT, 2) == reference


def test_a_step_abandoned_with_no_death_behind_it_ends_the_leaders_wait_for_a_declaration(tiny):
    """The leader's `_await_declaration`: a step's group is aborted under it (a network fault, nobody
    dead: Device-2 only stalls, shorter than the limit, to hold the step open); no declaration ever
    comes, so the wait ends after the wait limit, saying what was abandoned; the next step works."""
    heartbeat = HeartbeatConfig(interval_s=0.05, timeout_s=0.5)
    with new_model(tiny, even_assignment(tiny.config, 4), "threads", heartbeat=heartbeat) as model:
        tokens = model.generate(PROMPT, 2)
        model.arm(FailurePlan(2, mode="slow", delay_s=0.3, at_call=1))
        outcome: dict = {}

        def step() -> None:
            try:
                model.decode(tokens[-1])
            except WaitStalled as stalled:
                outcome["error"] = stalled

        stepping = threading.Thread(target=step, name="stepping", daemon=True)
        stepping.start()
        assert wait_until(lambda: bool(model.strikes), timeout_s=10)
        started = time.monotonic()
        model.transport.abort_epoch(model.epoch)
        stepping.join(timeout=heartbeat.wait_limit_s + 5)
        assert not stepping.is_alive(), "the leader waited for ever for a declaration"
        assert heartbeat.wait_limit_s - 0.1 <= time.monotonic() - started < heartbeat.wait_limit_s + 2
        assert re.search(r"to be declared dead; none was \(epoch \d+", str(outcome.get("error"))), outcome
        assert model.failures == []
        model.decode(tokens[-1])


def test_the_drivers_wait_is_kept_alive_by_progress_on_its_request_not_by_beats(tiny, monkeypatch):
    """TensorParallelLlama.request: the leader's thread is stuck in a request (planted) while every
    control thread beats on and sends telemetry. The driver's wait ends after twice the wait limit
    without progress on its request, naming it and the leader."""
    import cluster_leader
    stuck = threading.Event()
    monkeypatch.setattr(cluster_leader.Leader, "_on_Broadcast", lambda self, request: stuck.wait(30))
    with new_model(tiny, even_assignment(tiny.config, 4), "threads", heartbeat=SHORT) as model:
        started = time.monotonic()
        try:
            with pytest.raises(WaitStalled, match=r"the driver waited .* Broadcast to the leader, Device-0: no progress"):
                model.describe()
        finally:
            stuck.set()
        assert 2 * SHORT.wait_limit_s <= time.monotonic() - started < 2 * SHORT.wait_limit_s + 2
        assert any(kind == "beat" for _, _, kind, _ in model.events), "the devices beat on meanwhile"


# --------------------------------------------------------------------------------------------
# Replicate: a device and its buddy both lost


@pytest.mark.parametrize("failures, hidden, expected", [
    ([FailurePlan(1, 3, at_call=2), FailurePlan(2, 3, at_call=2)], False, "full-recompute"),
    ([FailurePlan(1, 3, at_call=2), FailurePlan(2, 3, at_call=2)], True, "reuse-hidden"),
    ([FailurePlan(1, 3, at_call=2), FailurePlan(2, 3, during_recovery=True)], False, "full-recompute"),
], ids=["together", "together-with-hidden-states", "buddy-during-recovery"])
def test_replicate_falls_back_when_a_device_and_its_buddy_are_lost(tiny_4kv, backend, failures, hidden, expected):
    outcome = run_scenario(tiny_4kv, even_assignment(tiny_4kv.config, 4), failures, backend, recovery="replicate",
                           replicate=True, hidden=hidden)
    outcome.assert_lossless()
    assert outcome.failed_devices == {1, 2}
    (rec,) = outcome.recoveries
    assert rec.strategy == expected
    assert rec.fallback_reason is not None
    assert "replicate impossible" in rec.fallback_reason and expected in rec.fallback_reason
    assert "KV head 2" in rec.fallback_reason  # Device-1's KV head (1-based), whose copy was on Device-2
    assert outcome.assignment.devices == (0, 3)


def test_replicate_needs_no_fallback_when_buddies_survive(tiny_4kv, backend):
    outcome = run_scenario(tiny_4kv, even_assignment(tiny_4kv.config, 4),
                           [FailurePlan(1, 3, at_call=2), FailurePlan(3, 3, at_call=2)], backend,
                           recovery="replicate", replicate=True)
    outcome.assert_lossless()
    (rec,) = outcome.recoveries
    assert rec.strategy == "replicate" and rec.fallback_reason is None
    assert outcome.assignment.devices == (0, 2)


def test_a_leader_that_took_over_keeps_replicating_so_a_later_loss_is_recovered_from_the_copy(tiny, backend):
    """Found by the property test: the new leader must learn that replication is on (from the
    devices), or it never re-protects after its recovery and a later loss finds no copy."""
    c = tiny.config
    assignment = custom_assignment({0: (0, 3, 4, 5, 6, 7), 1: (1,), 2: (2,)}, c.num_attention_heads,
                                   c.num_key_value_heads, c.intermediate_size)
    outcome = run_scenario(tiny, assignment, [FailurePlan(0, 1, at_call=1), FailurePlan(2, 2, at_call=1)], backend,
                           recovery="replicate", replicate=True)
    outcome.assert_lossless()
    assert [(r.strategy, r.fallback_reason) for r in outcome.recoveries] == [("replicate", None)] * 2


def test_replicate_crash_during_prefill_needs_no_fallback(tiny_4kv, backend):
    outcome = run_scenario(tiny_4kv, even_assignment(tiny_4kv.config, 4), [FailurePlan(1, after_tokens=0, at_call=2)],
                           backend, recovery="replicate", replicate=True)
    outcome.assert_lossless()
    (rec,) = outcome.recoveries
    assert (rec.strategy, rec.fallback_reason) == ("replicate", None)


# --------------------------------------------------------------------------------------------
# Two devices dead in one step, the second declared only after the recovery of the first began


def test_a_death_declared_after_the_recovery_began_restarts_it_and_leaves_nothing_queued(tiny, backend):
    """Device-1 and Device-3 die in the same step. Device-1 is declared (on another signal, by hand:
    the heartbeat timeout is too long to strike) and its recovery begins; only once the leader has
    asked the survivors to regroup (Device-3 among them, its threads already ended) is Device-3
    declared. The recovery must not wait for Device-3: it is started again on what is left, takes
    Device-3's declaration with it, and leaves none behind to come back as a stale failure (the next
    steps need no second recovery)."""
    if backend == "processes":
        pytest.skip("a SIGKILLed process is declared at once by its exit: a late declaration cannot be forced")
    assignment = even_assignment(tiny.config, 4)
    reference, _ = failure_free(tiny, assignment, 4)
    slow_beats = HeartbeatConfig(interval_s=0.05, timeout_s=60.0)
    with new_model(tiny, assignment, backend, heartbeat=slow_beats) as model:
        declared_when_recovery_began: list[tuple[int, ...]] = []
        regrouping = threading.Event()
        send = model.transport.send

        def watching_for_regroup(to, envelope) -> None:
            if isinstance(envelope.body, Regroup):
                regrouping.set()
            send(to, envelope)

        model.transport.send = watching_for_regroup

        def declare_once(device: int, after: Callable[[], bool]) -> threading.Thread:
            def run():
                if wait_until(after, timeout_s=60):
                    model.declare_dead(device, "test")
            thread = threading.Thread(target=run, name=f"declare-{device}", daemon=True)
            thread.start()
            return thread

        def recover(m, failure):
            declared_when_recovery_began.append(tuple(e.device for e in failure.events))
            declarers.append(declare_once(3, regrouping.is_set))
            m.recover("full-recompute")

        declarers = [declare_once(1, lambda: {s.device for s in model.strikes} == {1, 3})]
        tokens = generate_with_failures(model, PROMPT, 4, [FailurePlan(1, 1, at_call=2), FailurePlan(3, 1, at_call=2)],
                                        recover)
        for declarer in declarers:
            declarer.join()
    assert tokens == reference
    assert declared_when_recovery_began == [(1,)]
    (rec,) = model.recoveries
    assert [e.device for e in rec.events] == [1, 3] and rec.attempts == 2
    assert [e.detection.signal for e in rec.events] == ["test", "test"]
    assert [p.failed for p in rec.plans] == [1, 3]
    assert model.assignment.devices == (0, 2)


# --------------------------------------------------------------------------------------------
# Property: any device count, assignment, failure point, failed devices and strategies


@st.composite
def fault_scenarios(draw):
    devices = draw(st.integers(2, 4))
    if draw(st.booleans()):
        heads = None
    else:  # every device at least one head, the rest anywhere
        order = draw(st.permutations(range(8)))
        owners = list(range(devices)) + draw(st.lists(st.integers(0, devices - 1), min_size=8 - devices,
                                                      max_size=8 - devices))
        heads = {d: tuple(sorted(h for h, o in zip(order, owners) if o == d)) for d in range(devices)}
    count = draw(st.integers(1, min(2, devices - 1)))
    failed = draw(st.permutations(range(devices)))[:count]
    failures = tuple(FailurePlan(d, draw(st.integers(0, 3)), draw(st.integers(1, 6))) for d in failed)
    recovery = draw(st.sampled_from(sorted(RECOVERY_STRATEGIES)))
    reassign = draw(st.sampled_from(REASSIGN_STRATEGIES))
    seed = draw(st.integers(0, 9))
    hidden = recovery == "reuse-hidden" or draw(st.booleans())
    replicate = recovery == "replicate" or draw(st.booleans())
    return devices, heads, failures, recovery, reassign, seed, hidden, replicate


# Examples per backend: a processes example launches its device processes (about 5 s on two cores), so it
# runs fewer; FAULT_EXAMPLES sets every backend's count (FAULT_EXAMPLES=100 for a long hunt).
PROPERTY_EXAMPLES = {"threads": 20, "serialising": 20, "processes": 8}


def test_property_any_failures_recover_losslessly(tiny, backend):
    examples = int(os.environ.get("FAULT_EXAMPLES", PROPERTY_EXAMPLES[backend]))

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(scenario=fault_scenarios())
    def any_failures_recover_losslessly(scenario):
        check_any_failures_recover_losslessly(tiny, backend, scenario)

    any_failures_recover_losslessly()


def check_any_failures_recover_losslessly(tiny, backend: str, scenario) -> None:
    devices, heads, failures, recovery, reassign, seed, hidden, replicate = scenario
    c = tiny.config
    assignment = (even_assignment(c, devices) if heads is None else
                  custom_assignment(heads, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size))
    outcome = run_scenario(tiny, assignment, failures, backend, recovery=recovery, reassign=reassign, seed=seed,
                           hidden=hidden, replicate=replicate, new_tokens=5)
    outcome.assert_lossless()  # and check_recovered_state ran after every recovery
    assert outcome.failed_devices == {f.device for f in failures}
    survivors = set(range(devices)) - {f.device for f in failures}
    assert set(outcome.assignment.devices) == survivors
    owners = sorted(h for hs in outcome.assignment.heads.values() for h in hs)
    assert owners == list(range(c.num_attention_heads))
    for rec in outcome.recoveries:
        expected = expected_strategy(rec, recovery, hidden)
        assert (rec.strategy, rec.fallback_reason is not None) == (expected, expected != recovery), (
            rec.strategy, rec.fallback_reason)
    assert_no_project_threads()


def expected_strategy(rec: Recovery, asked: str, hidden: bool) -> str:
    """What a recovery must have used: the asked strategy, unless it is replicate and a lost KV head
    survived nowhere (its device and the buddy that held its copy both lost, context not empty)."""
    if asked != "replicate" or rec.context_tokens == 0:
        return asked
    before, after = rec.plans[0].before, rec.plans[-1].after
    ring = before.devices  # each device holds a copy of its predecessor's KV (ring order)
    survived = {g for d in after.devices for g in before.kv_heads(d) + before.kv_heads(ring[ring.index(d) - 1])}
    needed = {g for d in after.devices for g in after.kv_heads(d)}
    if needed <= survived:
        return asked
    return "reuse-hidden" if hidden else "full-recompute"


# --------------------------------------------------------------------------------------------
# The demo under Ctrl-C, and what its log says while it waits


def children_of(pid: int) -> list[int]:
    """The PIDs of `pid`'s child processes (from /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def _read_lines(stream, into: queue.Queue) -> None:
    for line in iter(stream.readline, b""):
        into.put(line.decode(errors="replace"))
    into.put(None)


@pytest.mark.parametrize("phase, marker, extra", [
    # logged just before the failing step, which blocks until the monitor declares the device dead (30 s here)
    ("detection", "waiting for its death to be declared", ("--context-tokens", "0", "--repeats", "1")),
    # logged before the strategies run, 40 times each over a 400-token context: seconds of device work
    ("comparison", "comparing 4 recovery strategies", ("--context-tokens", "400", "--repeats", "40")),
    # the same on device processes: every one of them must be gone too
    ("comparison", "comparing 4 recovery strategies", ("--context-tokens", "400", "--repeats", "40",
                                                       "--backend", "processes")),
], ids=["waiting-for-detection", "during-the-comparison", "during-the-comparison-processes"])
def test_ctrl_c_stops_the_demo_at_once_and_cleanly(tiny_checkpoint, tmp_path, phase, marker, extra):
    out = tmp_path / "out"
    out.mkdir()
    report = out / "report.txt"
    timeout = "30" if phase == "detection" else "0.25"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "execution_optimization_algorithm_demo.py"), "--model-dir", str(tiny_checkpoint),
         "--new-tokens", "4", "--fail-after", "2", *extra, "--heartbeat-interval", "0.05" if phase != "detection"
         else "1", "--heartbeat-timeout", timeout, "--report", str(report)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(process.stderr, lines), name="stderr-reader", daemon=True)
    reader.start()
    try:
        before: list[str] = []
        deadline = time.monotonic() + 60
        while not any(marker in line for line in before):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"the demo ended early: {''.join(before)}"
            before.append(line)
        time.sleep(0.5)
        assert process.poll() is None, "the demo ended before the interrupt"
        devices = children_of(process.pid)
        assert len(devices) == (3 if "processes" in extra else 0), devices  # Device-1 was SIGKILLed
        process.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        code = process.wait(timeout=30)
        elapsed = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=5)
    after = []
    while (line := lines.get(timeout=5)) is not None:
        after.append(line)
    stdout = process.stdout.read().decode()
    process.stdout.close()
    process.stderr.close()
    assert code == 130, "".join(before + after)
    assert [pid for pid in devices if process_exists(pid)] == [], "device processes outlived the demo"
    assert elapsed < 2.0, f"took {elapsed:.2f} s to stop after Ctrl-C"
    if phase == "detection":
        assert not any("declared dead" in line for line in before + after), "it was not waiting in detection"
    assert len(after) == 1 and after[0].startswith("interrupted"), after
    assert "Traceback" not in "".join(before + after) and stdout == ""
    assert sorted(p.name for p in out.iterdir()) == [], "a report or temp file was left"


def test_ctrl_c_at_any_moment_of_a_step_is_acted_on_at_a_wait_and_never_strands_a_device(tiny):
    """Real SIGINTs at random moments of many steps: each surfaces from the leader's wait point (never
    from inside a lock the devices need, as an interrupt inside concurrent.futures.wait() once did),
    and every device thread then stops at once."""
    import traceback
    from device_threads import interrupts_at_wait_points
    generator = torch.Generator().manual_seed(0)
    for attempt in range(12):
        model = new_model(tiny, even_assignment(tiny.config, 4), "threads")
        delay = 0.002 + 0.03 * torch.rand(1, generator=generator).item()
        sender = threading.Timer(delay, os.kill, args=(os.getpid(), signal.SIGINT))
        where = None
        try:
            with interrupts_at_wait_points():
                sender.start()
                with pytest.raises(KeyboardInterrupt) as interrupted:
                    for _ in range(1000):
                        model.generate(PROMPT, 3)
                where = traceback.extract_tb(interrupted.value.__traceback__)[-1].name
        finally:
            sender.cancel()
            stopping = time.monotonic()
            model.close()
            stopped_in = time.monotonic() - stopping
        assert where == "raise_if_interrupted", f"attempt {attempt}: interrupted inside {where}"
        assert stopped_in < 1.0, f"attempt {attempt}: closing took {stopped_in:.2f} s"
        assert_no_project_threads(grace_s=1.0)


def test_waiting_for_the_monitor_is_logged_before_the_device_is_declared_dead(tiny_checkpoint, tmp_path,
                                                                               monkeypatch, capsys):
    import cluster_leader
    times: dict[str, float] = {}
    declared = cluster_leader.Leader.declared

    def recording_declared(self, detection, failover=False):
        times.setdefault("declared", time.monotonic())
        return declared(self, detection, failover)
    monkeypatch.setattr(cluster_leader.Leader, "declared", recording_declared)

    class Stamped:
        def write(self, text):
            if "waiting for its death to be declared" in text:
                times.setdefault("waiting", time.monotonic())
            return len(text)

        def flush(self):
            pass
    monkeypatch.setattr(sys, "stderr", Stamped())
    code = demo.main(["--model-dir", str(tiny_checkpoint), "--context-tokens", "0", "--new-tokens", "4",
                      "--fail-after", "2", "--repeats", "1", "--recovery", "full-recompute",
                      "--heartbeat-interval", "0.1", "--heartbeat-timeout", "0.6", "--report", str(tmp_path / "r.txt")])
    monkeypatch.undo()
    capsys.readouterr()
    assert code == 0
    assert times["waiting"] < times["declared"]
