"""Specifications for the four KV-cache recovery strategies (kv_cache_reused.py) on real device threads.

Every scenario runs on the tiny presets with short heartbeats (0.05 s interval, 0.25 s timeout), so a
detection costs about a quarter of a second. The failure-free reference (its tokens and its KV at the
failure point) comes from a separate model with the same assignment and the same prompt.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from device_threads import DeviceCrashed, StepAbandoned
from fault_tolerant_cluster import FailureEvent, FailurePlan, FaultTolerantLlama, Recovery, generate_with_failures
from head_assignment import even_assignment
from heartbeat_detection import HeartbeatConfig
from kv_cache_reused import STRATEGIES, RecoveryImpossible, make_recovery
from llama_model_loader import Checkpoint
from lossless_checks import REBUILT_KV_TOLERANCE, KVCheck, check_kv, kept_heads, relative_error
from performance_comparator import failure_free_run, snapshot_kv
from task_reassign import make_strategy
from tensor_parallel_model import head_rows, load_device_shard

HEARTBEAT = HeartbeatConfig(interval_s=0.05, timeout_s=0.25)
# Four clusters at once (16 device threads) on two cores can keep a healthy device's beats silent
# for a quarter of a second: the concurrent scenarios wait longer before declaring a device dead.
CONCURRENT_HEARTBEAT = HeartbeatConfig(interval_s=0.05, timeout_s=1.0)
DTYPE = torch.float32
PROMPT = [256] + [(37 * i + 11) % 250 for i in range(23)]  # BOS + 23 byte tokens
NEW_TOKENS = 5
FAIL_AFTER = 2  # the step producing the 3rd token is abandoned; 24 + 1 tokens are cached then
SLACK_S = 0.3   # a loaded two-core machine may delay the monitor's poll
ALL_STRATEGIES = tuple(STRATEGIES)


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


def new_model(checkpoint: Checkpoint, devices: int, hidden: bool = False, replicate: bool = False,
              heartbeat: HeartbeatConfig = HEARTBEAT) -> FaultTolerantLlama:
    model = FaultTolerantLlama(checkpoint, even_assignment(checkpoint.config, devices), DTYPE, heartbeat=heartbeat)
    if hidden:
        model.enable_hidden_states()
    model.replication = replicate
    return model


_REFERENCES: dict[tuple[str, int], tuple[list[int], dict]] = {}


def failure_free(checkpoint: Checkpoint, devices: int) -> tuple[list[int], dict]:
    """Tokens of a failure-free run and its KV snapshot at the failure point (FAIL_AFTER tokens out)."""
    key = (str(checkpoint.folder), devices)
    if key not in _REFERENCES:
        model = new_model(checkpoint, devices)
        try:
            run = failure_free_run(model, PROMPT, NEW_TOKENS, FAIL_AFTER)
            _REFERENCES[key] = (run.tokens, run.kv)
        finally:
            model.close()
    return _REFERENCES[key]


def wait_declared(model: FaultTolerantLlama, devices: set[int], timeout_s: float = 3.0) -> None:
    """Wait until the monitor has declared every one of `devices` dead (several crashes in one step)."""
    deadline = time.monotonic() + timeout_s
    while not devices <= set(model.monitor.dead()) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert devices <= set(model.monitor.dead()), f"monitor declared only {model.monitor.dead()}"


@dataclass
class Checked:
    """What a recovery left, checked right after it (before decoding goes on)."""

    recovery: Recovery
    kv: KVCheck
    held_kv: set[int]
    position: int
    problems: list[str] = field(default_factory=list)


def check_after_recovery(model: FaultTolerantLlama, recovery: Recovery, reference_kv: dict,
                         kept: frozenset[tuple[int, int]]) -> Checked:
    """`kept`: the (device, KV head) pairs the strategy must have kept bit for bit."""
    states = {d: w.state for d, w in model.workers.items()}
    kv = check_kv(snapshot_kv(model), reference_kv, kept, DTYPE)
    problems = []
    for device, state in states.items():
        needed = set(model.assignment.kv_heads(device))
        if set(state.cache.kv_heads) != needed:
            problems.append(f"Device-{device} holds KV heads {state.cache.kv_heads}, needs {sorted(needed)}")
        if state.cache.length != model.position:
            problems.append(f"Device-{device} caches {state.cache.length} of {model.position} positions")
    held = {g for s in states.values() for g in s.cache.kv_heads}
    return Checked(recovery, kv, held, model.position, problems)


def run_with_crash(checkpoint: Checkpoint, devices: int, failures: list[FailurePlan], strategy: str,
                   reassign: str = "random", hidden: bool | None = None, replicate: bool | None = None,
                   wait_for: set[int] | None = None, heartbeat: HeartbeatConfig = HEARTBEAT
                   ) -> tuple[list[int], list[Checked], list[int]]:
    """The run with failures; returns (tokens, checks after each recovery, failure-free tokens)."""
    reference, reference_kv = failure_free(checkpoint, devices)
    hidden = strategy == "reuse-hidden" if hidden is None else hidden
    replicate = strategy == "replicate" if replicate is None else replicate
    model = new_model(checkpoint, devices, hidden, replicate, heartbeat)
    checks: list[Checked] = []
    try:
        def recover(m: FaultTolerantLlama, event: FailureEvent) -> None:
            if wait_for:
                wait_declared(m, wait_for)
            held_before = {d: m.assignment.kv_heads(d) for d in m.workers if d not in m.monitor.dead()}
            result = m.recover(event, make_strategy(reassign, 0), make_recovery(strategy))
            kept = kept_heads({d: held_before[d] for d in m.workers}, make_recovery(result.strategy).reuses_kv)
            checks.append(check_after_recovery(m, result, reference_kv, kept))

        tokens = generate_with_failures(model, PROMPT, NEW_TOKENS, failures, recover)
    finally:
        model.close()
    return tokens, checks, reference


def assert_lossless(tokens: list[int], checks: list[Checked], reference: list[int], config) -> None:
    assert checks, "no recovery happened"
    for check in checks:
        assert not check.problems, check.problems
        assert check.held_kv == set(range(config.num_key_value_heads)), f"KV heads held: {sorted(check.held_kv)}"
        assert check.kv.ok, check.kv.describe()
    assert tokens == reference, "tokens after recovery differ from the failure-free run"


# --------------------------------------------------------------------------------------------
# Every strategy is lossless, whichever device fails (the leader included)


def _lossless_cases():
    cases = [(4, device, reassign) for device in range(4) for reassign in ("random", "balanced")]
    cases += [(3, device, reassign) for device in range(3) for reassign in ("random", "balanced")]
    cases += [(2, device, "random") for device in range(2)]  # one survivor takes everything: random == balanced
    return cases


def run_concurrently(jobs: dict[str, callable], timeout_s: float = 60.0) -> dict[str, object]:
    """Run independent scenarios (each on its own model) at once, so that their detections overlap."""
    results: dict[str, object] = {}

    def run(name, job):
        try:
            results[name] = job()
        except BaseException as error:  # noqa: BLE001 - reported by the caller
            results[name] = error
    threads = [threading.Thread(target=run, args=item, name=f"scenario-{item[0]}", daemon=True)
               for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "a scenario did not finish"
    return results


@pytest.mark.parametrize("devices, device, reassign", _lossless_cases(), ids=lambda v: str(v))
def test_every_strategy_is_lossless_after_a_crash(tiny, devices, device, reassign):
    """The four strategies run side by side (one model each) from the same crash of `device`."""
    failure_free(tiny, devices)  # computed once, before the threads
    outcomes = run_concurrently({
        strategy: (lambda strategy=strategy: run_with_crash(tiny, devices, [FailurePlan(device, FAIL_AFTER)],
                                                            strategy, reassign, heartbeat=CONCURRENT_HEARTBEAT))
        for strategy in ALL_STRATEGIES})
    problems = {}
    for strategy, outcome in outcomes.items():
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            tokens, checks, reference = outcome
            (check,) = checks
            assert check.recovery.strategy == strategy, check.recovery.strategy
            assert check.recovery.fallback_reason is None, check.recovery.fallback_reason
            assert [e.device for e in check.recovery.events] == [device]
            assert check.recovery.events[0].leader == (1 if device == 0 else 0)
            assert check.recovery.plans[0].strategy == reassign
            assert check.position == len(PROMPT) + FAIL_AFTER - 1
            assert_lossless(tokens, checks, reference, tiny.config)
        except BaseException as error:  # noqa: BLE001 - every strategy is reported
            problems[strategy] = f"{type(error).__name__}: {error}"
    assert not problems, problems


# --------------------------------------------------------------------------------------------
# Reuse keeps the survivors' KV as it was; full recompute rebuilds everything


POISON = 1000.0


def crash_at_fail_after(model: FaultTolerantLlama, failed: int,
                        after_prefill: Callable[[FaultTolerantLlama], object] = lambda model: None) -> FailureEvent:
    """Generate FAIL_AFTER tokens, then crash `failed` in the next step; the declared failure.
    `after_prefill` runs between the prefill and the first decode step."""
    tokens = [int(model.prefill(PROMPT).argmax())]
    after_prefill(model)
    while len(tokens) < FAIL_AFTER:
        tokens.append(int(model.decode(tokens[-1]).argmax()))
    model.arm(FailurePlan(failed, FAIL_AFTER))
    with pytest.raises(StepAbandoned):
        model.decode(tokens[-1])
    return model.wait_for_failure()


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_reuse_keeps_survivors_kv_and_full_recompute_rebuilds_it(tiny, strategy):
    """Survivors' KV is poisoned (+1000) after the failure: a reuse strategy must keep exactly those
    entries (bit-identical, so kept and not recomputed), full recompute must not keep any of them."""
    devices, failed = 4, 1
    _, reference_kv = failure_free(tiny, devices)
    model = new_model(tiny, devices, hidden=True, replicate=True)
    try:
        event = crash_at_fail_after(model, failed)
        length = model.position
        assert length == len(PROMPT) + FAIL_AFTER - 1
        kept: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for device, worker in model.workers.items():
            if device == failed:
                continue
            cache = worker.state.cache
            for layer in range(cache.num_layers):
                slot_k, slot_v = cache.k[layer], cache.v[layer]
                slot_k[:, :length] += POISON
                slot_v[:, :length] += POISON
                for g in cache.kv_heads:
                    i = cache.kv_heads.index(g)
                    kept[(device, layer, g)] = (slot_k[i, :length].clone(), slot_v[i, :length].clone())
        assert kept
        result = model.recover(event, make_strategy("random", 0), make_recovery(strategy))
        assert result.strategy == strategy and result.fallback_reason is None
        for (device, layer, g), (k_before, v_before) in kept.items():
            k_after, v_after = model.workers[device].state.cache.head(layer, g)
            if strategy == "full-recompute":
                want_k, want_v = reference_kv[(device, layer, g)]
                assert relative_error(k_after, want_k) <= REBUILT_KV_TOLERANCE[DTYPE], (device, layer, g)
                assert relative_error(v_after, want_v) <= REBUILT_KV_TOLERANCE[DTYPE], (device, layer, g)
            else:
                assert torch.equal(k_after, k_before), f"Device-{device} layer {layer} KV head {g}: K changed"
                assert torch.equal(v_after, v_before), f"Device-{device} layer {layer} KV head {g}: V changed"
    finally:
        model.close()


@pytest.mark.parametrize("strategy", ["reuse-replay", "reuse-hidden", "replicate"])
def test_reuse_strategies_keep_survivors_kv_bit_identical(tiny, strategy):
    """Without poisoning: the KV a survivor held before the failure is the same bits after it."""
    devices, failed = 4, 2
    model = new_model(tiny, devices, hidden=True, replicate=True)
    try:
        logits = model.prefill(PROMPT)
        model.arm(FailurePlan(failed, 1))
        with pytest.raises(StepAbandoned):
            model.decode(int(logits.argmax()))
        event = model.wait_for_failure()
        length = model.position
        before = {(d, layer, g): tuple(t[:length].clone() for t in w.state.cache.head(layer, g))
                  for d, w in model.workers.items() if d != failed
                  for layer in range(tiny.config.num_hidden_layers) for g in w.state.cache.kv_heads}
        model.recover(event, make_strategy("balanced"), make_recovery(strategy))
        for (d, layer, g), (k, v) in before.items():
            k_after, v_after = model.workers[d].state.cache.head(layer, g)
            assert torch.equal(k_after, k) and torch.equal(v_after, v), (d, layer, g)
    finally:
        model.close()


# --------------------------------------------------------------------------------------------
# What a strategy needs kept during normal running; the fallback when it was not kept


def crash_and_prepare(model: FaultTolerantLlama, failed: int):
    logits = model.prefill(PROMPT)
    model.arm(FailurePlan(failed, 1))
    with pytest.raises(StepAbandoned):
        model.decode(int(logits.argmax()))
    event = model.wait_for_failure()
    post, _ = model.prepare_recovery([event], make_strategy("random", 0))
    return post


@pytest.mark.parametrize("strategy, message", [("replicate", "survived nowhere"),
                                               ("reuse-hidden", "hidden-state")])
def test_strategy_without_its_kept_state_raises_recovery_impossible(tiny, strategy, message):
    # two devices: the failed device's KV head is held by no survivor, so only a replica could save it
    model = new_model(tiny, 2, hidden=False, replicate=False)
    try:
        post = crash_and_prepare(model, 1)
        with pytest.raises(RecoveryImpossible, match=message):
            make_recovery(strategy).recover(model, post.copy())
        # the same state with what the strategy needs is recoverable by the fallback
        states = make_recovery("full-recompute").recover(model, post.copy())
        assert set(states) == {0}
    finally:
        model.close()


@pytest.mark.parametrize("strategy, hidden, replicate, fallback", [
    ("replicate", False, False, "full-recompute"),
    ("replicate", True, False, "reuse-hidden"),
    ("reuse-hidden", False, True, "full-recompute"),
    ("reuse-hidden", False, False, "full-recompute"),
])
def test_recover_falls_back_when_the_kept_state_is_missing_and_stays_lossless(tiny, strategy, hidden, replicate,
                                                                              fallback):
    tokens, checks, reference = run_with_crash(tiny, 2, [FailurePlan(1, FAIL_AFTER)], strategy,
                                               hidden=hidden, replicate=replicate)
    (check,) = checks
    assert check.recovery.strategy == fallback
    reason = check.recovery.fallback_reason
    assert reason is not None and strategy in reason and "impossible" in reason and fallback in reason, reason
    assert_lossless(tokens, checks, reference, tiny.config)


@pytest.mark.parametrize("hidden, fallback", [(False, "full-recompute"), (True, "reuse-hidden")])
def test_device_and_its_buddy_lost_together_makes_replicate_impossible(tiny_4kv, hidden, fallback):
    """tiny-4kv over 4 devices: each device holds one KV head alone; Device-2 keeps Device-1's copy."""
    tokens, checks, reference = run_with_crash(tiny_4kv, 4, [FailurePlan(1, FAIL_AFTER), FailurePlan(2, FAIL_AFTER)],
                                               "replicate", hidden=hidden, replicate=True, wait_for={1, 2})
    (check,) = checks
    assert {e.device for e in check.recovery.events} == {1, 2}
    assert check.recovery.strategy == fallback
    reason = check.recovery.fallback_reason
    assert reason is not None and "replicate impossible" in reason and fallback in reason, reason
    assert_lossless(tokens, checks, reference, tiny_4kv.config)


def test_replicate_works_when_only_the_device_is_lost(tiny_4kv):
    tokens, checks, reference = run_with_crash(tiny_4kv, 4, [FailurePlan(1, FAIL_AFTER)], "replicate")
    (check,) = checks
    assert check.recovery.strategy == "replicate" and check.recovery.fallback_reason is None
    assert_lossless(tokens, checks, reference, tiny_4kv.config)


# --------------------------------------------------------------------------------------------
# Weight inheritance: the new owner reads only what it inherits


def test_new_owner_reads_only_inherited_slices_and_holds_the_checkpoints_weights(tiny_checkpoint):
    checkpoint = Checkpoint(tiny_checkpoint)  # its own instance: `read` is wrapped below
    config, hd, failed = checkpoint.config, checkpoint.config.head_dim, 1
    model = new_model(checkpoint, 4, hidden=True)
    reads: list[tuple[str, object, object]] = []
    original_read = checkpoint.read
    recording = threading.Event()

    def read(name, dtype, rows=None, cols=None, **options):
        if recording.is_set():
            reads.append((name, rows, cols))
        return original_read(name, dtype, rows=rows, cols=cols, **options)

    checkpoint.read = read
    try:
        before = model.assignment
        logits = model.prefill(PROMPT)
        model.arm(FailurePlan(failed, 1))
        with pytest.raises(StepAbandoned):
            model.decode(int(logits.argmax()))
        event = model.wait_for_failure()
        recording.set()
        result = model.recover(event, make_strategy("random", 0), make_recovery("reuse-hidden"))
        recording.clear()
        (plan,) = result.plans
        (receiver,) = plan.receivers
        moved = plan.moved_heads[receiver]
        assert moved == before.heads[failed]
        after = model.assignment
        assert set(after.heads[receiver]) == set(before.heads[receiver]) | set(before.heads[failed])

        # every read is of the receiver's inherited slices (norm vectors are replicated and tiny)
        new_kv = plan.kv_to_rebuild[receiver]
        expected_rows = {"self_attn.q_proj.weight": head_rows(moved, hd),
                         "self_attn.k_proj.weight": head_rows(new_kv, hd),
                         "self_attn.v_proj.weight": head_rows(new_kv, hd),
                         "mlp.gate_proj.weight": list(plan.moved_mlp[receiver]),
                         "mlp.up_proj.weight": list(plan.moved_mlp[receiver])}
        expected_cols = {"self_attn.o_proj.weight": head_rows(moved, hd),
                         "mlp.down_proj.weight": list(plan.moved_mlp[receiver])}
        assert reads, "the receiver read nothing"
        for name, rows, cols in reads:
            assert name.startswith("model.layers."), f"re-read a replicated tensor: {name}"
            kind = name.split(".", 3)[3]
            if kind.endswith("layernorm.weight"):
                continue
            if kind in expected_rows:
                assert list(rows) == expected_rows[kind] and cols is None, (name, rows, cols)
            else:
                assert list(cols) == expected_cols[kind] and rows is None, (name, rows, cols)
        read_rows = sum(b - a for name, rows, _ in reads if name.endswith("q_proj.weight") for a, b in rows)
        assert read_rows == len(moved) * hd * config.num_hidden_layers

        # the extended shard equals a fresh load of the new assignment, block by block
        shard = model.workers[receiver].state.shard
        fresh = load_device_shard(Checkpoint(tiny_checkpoint), after, receiver, DTYPE)
        assert sorted(shard.query_heads) == list(fresh.query_heads)
        assert sorted(shard.kv_heads) == list(fresh.kv_heads)
        columns = [c for a, b in shard.mlp for c in range(a, b)]
        fresh_columns = [c for a, b in fresh.mlp for c in range(a, b)]
        assert sorted(columns) == fresh_columns
        nq, nkv = len(shard.query_heads), len(shard.kv_heads)
        for mine, theirs in zip(shard.layers, fresh.layers):
            for i, h in enumerate(shard.query_heads):
                j = fresh.query_heads.index(h)
                assert torch.equal(mine.wqkv[i * hd:(i + 1) * hd], theirs.wqkv[j * hd:(j + 1) * hd]), f"Q head {h}"
                assert torch.equal(mine.wo[:, i * hd:(i + 1) * hd], theirs.wo[:, j * hd:(j + 1) * hd]), f"O head {h}"
            for i, g in enumerate(shard.kv_heads):
                j = fresh.kv_heads.index(g)
                for base, fresh_base in ((nq, nq), (nq + nkv, nq + nkv)):  # K block, then V block
                    got = mine.wqkv[(base + i) * hd:(base + i + 1) * hd]
                    want = theirs.wqkv[(fresh_base + j) * hd:(fresh_base + j + 1) * hd]
                    assert torch.equal(got, want), f"K/V head {g}"
            width, fresh_width = len(columns), len(fresh_columns)
            for i, c in enumerate(columns):
                j = fresh_columns.index(c)
                assert torch.equal(mine.w_gate_up[i], theirs.w_gate_up[j]), f"gate column {c}"
                assert torch.equal(mine.w_gate_up[width + i], theirs.w_gate_up[fresh_width + j]), f"up column {c}"
                assert torch.equal(mine.w_down[:, i], theirs.w_down[:, j]), f"down column {c}"
    finally:
        checkpoint.read = original_read
        model.close()


# --------------------------------------------------------------------------------------------
# Detection


def test_crash_is_declared_within_timeout_plus_one_interval(tiny):
    model = new_model(tiny, 4)
    try:
        logits = model.prefill(PROMPT)
        model.arm(FailurePlan(3, 1))
        with pytest.raises(StepAbandoned):
            model.decode(int(logits.argmax()))
        event = model.wait_for_failure()
        assert event.device == 3 and event.leader == 0
        bound = HEARTBEAT.timeout_s + HEARTBEAT.interval_s + SLACK_S
        assert 0 < event.detection_latency_s <= bound, event.detection_latency_s
        # never declared before `timeout` of silence
        assert event.detection.silence_s > HEARTBEAT.timeout_s
        died = [t for t, d, kind, _ in model.log.events if d == 3 and kind == "died"]
        declared = [t for t, d, kind, _ in model.log.events if d == 3 and kind == "declared dead"]
        assert died and declared and 0 < declared[0] - died[0] <= bound
    finally:
        model.close()


# --------------------------------------------------------------------------------------------
# A second device that died in the same step but is declared after the recovery began: the recovery
# must not wait on the ended thread of the device not yet declared


def test_second_crash_declared_after_recovery_began_does_not_deadlock(tiny):
    model = new_model(tiny, 4)
    late = model.senders[2]

    class LateSilence:
        """Device-2 dies with Device-1, but its silence starts when the recovery reads weights:
        as if its last heartbeat had come just before the recovery began."""

        def silence(self):
            pass

        def stop(self):
            late.stop()

    inherit = model.inherit_weights

    def inherit_weights(assignment):
        late.silence()
        return inherit(assignment)

    model.senders[2] = LateSilence()
    model.inherit_weights = inherit_weights
    result: dict = {}
    recoveries: list[Recovery] = []
    driver = None
    try:
        reference, _ = failure_free(tiny, 4)

        def drive():
            try:
                result["tokens"] = generate_with_failures(
                    model, PROMPT, NEW_TOKENS, [FailurePlan(1, FAIL_AFTER), FailurePlan(2, FAIL_AFTER)],
                    lambda m, e: recoveries.append(m.recover(e, make_strategy("random", 0),
                                                             make_recovery("full-recompute"))))
            except BaseException as error:  # noqa: BLE001 - checked below
                result["error"] = error

        driver = threading.Thread(target=drive, name="recovery-driver", daemon=True)
        driver.start()
        driver.join(timeout=1.5)
        stuck = driver.is_alive()
    finally:
        if driver is not None and driver.is_alive():  # unblock it: fail what waits in Device-2's queue
            tasks = model.workers[2]._tasks if 2 in model.workers else None
            while tasks is not None and not tasks.empty():
                item = tasks.get_nowait()
                if item is not None:
                    item[1].set_exception(DeviceCrashed("Device-2 is gone"))
            driver.join(timeout=5.0)
        model.senders[2] = late
        model.close()
    assert not stuck, "recovery deadlocked on a crashed device declared after it began"
    assert "error" not in result, result.get("error")
    assert result["tokens"] == reference
    assert {e.device for r in recoveries for e in r.events} == {1, 2}
    assert set(model.assignment.devices) == {0, 3}


# --------------------------------------------------------------------------------------------
# State switched on in the middle of a run never claims positions it does not hold


def test_replication_enabled_after_the_prefill_copies_what_is_cached_and_replicate_works(tiny_4kv):
    _, reference_kv = failure_free(tiny_4kv, 4)
    model = new_model(tiny_4kv, 4)
    try:
        event = crash_at_fail_after(model, 1, after_prefill=FaultTolerantLlama.enable_replication)
        assert model.workers[2].state.replicas[1].length == len(PROMPT) + FAIL_AFTER - 1
        held = {d: model.assignment.kv_heads(d) for d in (0, 2, 3)}
        result = model.recover(event, make_strategy("random", 0), make_recovery("replicate"))
        assert (result.strategy, result.fallback_reason) == ("replicate", None)
        kv = check_kv(snapshot_kv(model), reference_kv, kept_heads(held, True), DTYPE)
        assert kv.ok and kv.rebuilt_max_rel_error == 0.0, kv.describe()  # the copy is the same bits
    finally:
        model.close()


@pytest.mark.parametrize("preset, switch_on, asked, why", [
    # tiny-4kv over 4 devices: only Device-2's copy holds Device-1's KV head
    ("tiny_4kv", lambda m: setattr(m, "replication", True), "replicate", "KV head 2 survived nowhere"),
    ("tiny", FaultTolerantLlama.enable_hidden_states, "reuse-hidden",
     f"the hidden states hold 0 of the {len(PROMPT) + FAIL_AFTER - 1} cached positions"),
], ids=["replica", "hidden-states"])
def test_state_switched_on_after_the_prefill_claims_nothing_and_the_strategy_falls_back(request, preset, switch_on,
                                                                                       asked, why):
    """Switched on after the prefill (the replica by its flag alone), the kept state holds the later
    positions only: a recovery must not read the zeros before them, so the strategy is impossible,
    and the fallback says why and is lossless."""
    checkpoint = request.getfixturevalue(preset)
    devices = 4 if preset == "tiny_4kv" else 2
    _, reference_kv = failure_free(checkpoint, devices)
    model = new_model(checkpoint, devices)
    try:
        event = crash_at_fail_after(model, 1, after_prefill=switch_on)
        survivors = [w.state for d, w in model.workers.items() if d != 1]
        claimed = [s.hidden_states.length if asked == "reuse-hidden" else s.replicas.get(1, s.cache).length
                   for s in survivors if asked == "reuse-hidden" or 1 in s.replicas]
        assert claimed and set(claimed) == {0}, f"positions claimed: {claimed}"
        result = model.recover(event, make_strategy("random", 0), make_recovery(asked))
        assert result.strategy == "full-recompute"
        assert f"{asked} impossible ({why}" in result.fallback_reason, result.fallback_reason
        assert check_kv(snapshot_kv(model), reference_kv, frozenset(), DTYPE).ok
    finally:
        model.close()
