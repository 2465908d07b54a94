"""Specifications for performance_comparator.py: timings, FLOP counts, reuse rates, KV checks.

FLOP figures are checked on the real Llama-3.2-1B shapes (DESIGN.md section 3) with shape-only
post-failure states (shards without weights); what needs a model runs on the tiny preset.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

import execution_optimization_algorithm_demo as demo
from device_threads import StepAbandoned
from fault_tolerant_cluster import FailurePlan, FaultTolerantLlama, PostFailureState, Survivor
from head_assignment import even_assignment
from heartbeat_detection import HeartbeatConfig
from kv_cache_reused import STRATEGIES, RecoveryImpossible
from llama_model_loader import Checkpoint
from lossless_checks import LOGITS_TOLERANCE, REBUILT_KV_TOLERANCE, KVCheck, check_kv
from performance_comparator import (StrategyOutcome, Timing, compare_recoveries, failure_free_run, forward_flops,
                                    measure_keeping_cost, recovery_flops, reuse_rate, snapshot_kv, time_strategies)
from synthetic_checkpoint import preset_config
from task_reassign import make_strategy
from tensor_parallel_model import DeviceShard, KVCache

HEARTBEAT = HeartbeatConfig(interval_s=0.05, timeout_s=0.25)
PROMPT = [256] + [(29 * i + 3) % 250 for i in range(19)]
CONFIG_1B = preset_config("llama-3.2-1b")
CONTEXT = 512


# --------------------------------------------------------------------------------------------
# Timing


def test_timing_min_median_max():
    t = Timing((0.3, 0.1, 0.5, 0.2))
    assert (t.min, t.median, t.max) == (0.1, 0.25, 0.5)
    assert Timing((2.0,)).median == 2.0
    assert Timing((0.4, 0.1, 0.2)).median == 0.2


class FakeStrategy:
    def __init__(self, name: str, calls: list, impossible: bool = False, seconds: float = 0.0):
        self.name, self.keeps, self.calls, self.impossible, self.seconds = name, "nothing", calls, impossible, seconds

    def recover(self, model, post):
        self.calls.append((self.name, post))
        if self.impossible:
            raise RecoveryImpossible("cannot")
        time.sleep(self.seconds)
        return {"state of": self.name}


class FakePost:
    """Counts its copies; each run must get a fresh one."""

    def __init__(self, copies: list | None = None):
        self.copies = copies if copies is not None else []
        self.survivors = {}

    def copy(self):
        copy = FakePost(self.copies)
        self.copies.append(copy)
        return copy


def new_tiny_model(tiny_checkpoint) -> FaultTolerantLlama:
    """A FaultTolerantLlama on the tiny checkpoint: 4 devices, fp32, short heartbeats (the caller closes it)."""
    checkpoint = Checkpoint(tiny_checkpoint)
    return FaultTolerantLlama(checkpoint, even_assignment(checkpoint.config, 4), torch.float32, heartbeat=HEARTBEAT)


@pytest.fixture
def tiny_model(tiny_checkpoint):
    model = new_tiny_model(tiny_checkpoint)
    try:
        yield model
    finally:
        model.close()


def test_time_strategies_alternates_and_gives_repeats_samples_each(tiny_model):
    calls: list = []
    strategies = [FakeStrategy("a", calls), FakeStrategy("b", calls, seconds=0.002), FakeStrategy("c", calls)]
    post = FakePost()
    timings, states, errors = time_strategies(tiny_model, post, strategies, repeats=4)
    order = [name for name, _ in calls]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]  # rotated each round
    assert set(timings) == {"a", "b", "c"} and errors == {}
    assert all(len(t.seconds) == 4 for t in timings.values())
    assert timings["b"].min >= 0.002  # each strategy's own runs are timed
    assert states == {n: {"state of": n} for n in "abc"}
    # every run starts from its own copy of the post-failure state, never the original
    assert len(post.copies) == 12 and len({id(p) for _, p in calls}) == 12 and all(p is not post for _, p in calls)


def test_time_strategies_reports_an_impossible_strategy_once_and_times_the_rest(tiny_model):
    calls: list = []
    strategies = [FakeStrategy("a", calls), FakeStrategy("x", calls, impossible=True), FakeStrategy("c", calls)]
    timings, states, errors = time_strategies(tiny_model, FakePost(), strategies, repeats=3)
    assert errors == {"x": "cannot"}
    assert set(timings) == {"a", "c"} and "x" not in states
    assert [n for n, _ in calls].count("x") == 1
    assert all(len(t.seconds) == 3 for t in timings.values())


# --------------------------------------------------------------------------------------------
# Ratios come from the comparison's own timings


def outcome(name: str, seconds: tuple[float, ...] | None, flops: float, redo_s: float = 0.5) -> StrategyOutcome:
    return StrategyOutcome(name, "nothing", Timing(seconds) if seconds else None, flops, 0.0, 0,
                           kv=KVCheck(0.0, 0.0, 1e-4), logits_max_rel_diff=0.0, logits_tolerance=1e-4,
                           tokens_identical=True, redo_s=redo_s)


def test_comparison_rows_speedup_is_the_ratio_of_medians():
    rows = demo.comparison_rows([outcome("full-recompute", (3.0, 1.0, 2.0), 100.0),
                                 outcome("reuse-replay", (1.0, 0.5, 0.25), 97.0),
                                 outcome("replicate", (0.1, 0.2, 0.4), 0.0)], detection_s=5.0, weights_s=1.0)
    by_name = {r["name"]: r for r in rows}
    assert by_name["full-recompute"]["speedup"] == pytest.approx(1.0)
    assert by_name["reuse-replay"]["speedup"] == pytest.approx(2.0 / 0.5)
    assert by_name["replicate"]["speedup"] == pytest.approx(2.0 / 0.2)
    assert by_name["reuse-replay"]["flop_ratio"] == pytest.approx(100.0 / 97.0)
    assert by_name["replicate"]["flop_ratio"] == float("inf")
    assert by_name["reuse-replay"]["median_s"] == 0.5 and by_name["reuse-replay"]["min_s"] == 0.25


def test_comparison_rows_without_the_baseline_give_no_ratio():
    (row,) = demo.comparison_rows([outcome("reuse-hidden", (0.1,), 5.0)], detection_s=5.0, weights_s=1.0)
    assert row["speedup"] is None and row["flop_ratio"] is None and row["interruption_ratio"] is None
    assert row["interruption_s"] == pytest.approx(5.0 + 1.0 + 0.1 + 0.5)


def test_the_whole_interruption_is_detection_weights_rebuild_and_redo():
    rows = demo.comparison_rows([outcome("full-recompute", (3.0, 1.0, 2.0), 100.0, redo_s=0.25),
                                 outcome("replicate", (0.1, 0.2, 0.4), 0.0, redo_s=0.5)], detection_s=4.0,
                                weights_s=1.5)
    by_name = {r["name"]: r for r in rows}
    assert by_name["full-recompute"]["interruption_s"] == pytest.approx(4.0 + 1.5 + 2.0 + 0.25)
    assert by_name["replicate"]["interruption_s"] == pytest.approx(4.0 + 1.5 + 0.2 + 0.5)
    assert by_name["replicate"]["interruption_ratio"] == pytest.approx(7.75 / 6.2)
    assert by_name["replicate"]["speedup"] == pytest.approx(10.0)  # the rebuild alone: 10x; the whole: 1.25x


def test_demo_report_ratios_match_its_own_timings(tiny_demo_run):
    options, report, _ = tiny_demo_run
    rows = {r["name"]: r for r in report["comparison"]}
    assert set(rows) == set(STRATEGIES)
    baseline = rows["full-recompute"]
    for name, row in rows.items():
        assert len(row["seconds"]) == options.repeats
        assert row["median_s"] == statistics.median(row["seconds"])
        assert (row["min_s"], row["max_s"]) == (min(row["seconds"]), max(row["seconds"]))
        assert row["speedup"] == pytest.approx(baseline["median_s"] / row["median_s"], rel=1e-12), name
        expected_flop_ratio = baseline["flops"] / row["flops"] if row["flops"] else float("inf")
        assert row["flop_ratio"] == pytest.approx(expected_flop_ratio, rel=1e-12), name


# --------------------------------------------------------------------------------------------
# FLOPs counted from shapes (Llama-3.2-1B, 512-token context, one device of four lost)


def shape_only_post(reassign: str, failed: int = 1, context: int = CONTEXT) -> PostFailureState:
    """A post-failure state with the survivors' real shapes but no weights and no KV values."""
    c = CONFIG_1B
    before = even_assignment(c, 4)
    plan = make_strategy(reassign, 0).plan(before, failed)
    after = plan.after
    survivors = {}
    for d in after.devices:
        shard = DeviceShard(d, after.heads[d], after.kv_heads(d), after.mlp[d], [], after.group_size)
        cache = KVCache(c.num_hidden_layers, before.kv_heads(d), c.head_dim, torch.bfloat16, capacity=1)
        survivors[d] = Survivor(shard, cache, None, {})
    return PostFailureState([plan], torch.zeros(context, dtype=torch.long), survivors)


def test_full_prefill_of_the_1b_model_is_about_one_teraflop():
    c = CONFIG_1B
    assignment = even_assignment(c, 4)
    flops = forward_flops(c, assignment, CONTEXT)
    assert flops == pytest.approx(1.0e12, rel=0.10)
    # DESIGN.md: about 61M multiply-adds per token per layer, most of it the MLP
    per_token_layer_macs = (2 * c.hidden_size * c.num_attention_heads * c.head_dim
                            + 2 * c.hidden_size * c.num_key_value_heads * c.head_dim
                            + 3 * c.hidden_size * c.intermediate_size)
    assert per_token_layer_macs == pytest.approx(61e6, rel=0.01)
    matmuls = 2 * per_token_layer_macs * CONTEXT * c.num_hidden_layers
    assert matmuls < flops < matmuls * 1.05  # plus attention over the causal half
    # splitting over devices without duplicated KV heads changes nothing
    one = even_assignment(c, 1)
    assert forward_flops(c, one, CONTEXT) == pytest.approx(flops, rel=1e-12)


@pytest.mark.parametrize("reassign", ["random", "balanced"])
def test_replay_saves_only_the_survivors_kv_projections(reassign):
    c, post = CONFIG_1B, shape_only_post(reassign)
    full = recovery_flops("full-recompute", c, post)
    replay = recovery_flops("reuse-replay", c, post)
    saving = 1 - replay / full
    assert 0.01 < saving < 0.05, saving
    kept_heads = 6  # three survivors kept their 2 KV heads each
    kv_projections = 2 * CONTEXT * c.hidden_size * 2 * c.head_dim * kept_heads * c.num_hidden_layers
    assert full - replay == pytest.approx(kv_projections, rel=1e-12)


@pytest.mark.parametrize("reassign", ["random", "balanced"])
def test_rebuilding_from_hidden_states_is_over_fifty_times_fewer_flops(reassign):
    c, post = CONFIG_1B, shape_only_post(reassign)
    full = recovery_flops("full-recompute", c, post)
    hidden = recovery_flops("reuse-hidden", c, post)
    assert hidden == pytest.approx(8.6e9, rel=0.01)  # DESIGN.md: 2 KV heads from checkpoints, about 8.6 GFLOP
    assert full / hidden > 50
    assert recovery_flops("replicate", c, post) == 0.0


@pytest.mark.parametrize("reassign", ["random", "balanced"])
def test_reuse_rate_is_the_share_of_kv_entries_kept(reassign):
    post = shape_only_post(reassign)
    c, plan = CONFIG_1B, post.plan
    needed = kept = 0
    for d in plan.after.devices:  # entries: (layer, KV head, position) per device
        entries = c.num_hidden_layers * CONTEXT
        needed += len(plan.after.kv_heads(d)) * entries
        kept += len(set(plan.after.kv_heads(d)) & set(plan.before.kv_heads(d))) * entries
    assert kept / needed == 0.75  # 3 of 4 devices' KV kept
    assert reuse_rate("full-recompute", post) == 0.0
    for name in ("reuse-replay", "reuse-hidden", "replicate"):
        assert reuse_rate(name, post) == pytest.approx(kept / needed)


# --------------------------------------------------------------------------------------------
# Snapshots


def test_snapshot_holds_every_devices_own_copy_of_every_head_it_holds(tiny_model):
    tiny_model.generate(PROMPT, 3)
    snapshot = snapshot_kv(tiny_model)
    config = tiny_model.config
    expected = {(d, layer, g) for d in tiny_model.assignment.devices for layer in range(config.num_hidden_layers)
                for g in tiny_model.assignment.kv_heads(d)}
    assert set(snapshot) == expected
    for (d, layer, g), (k, v) in snapshot.items():
        cached_k, cached_v = tiny_model.workers[d].state.cache.head(layer, g)
        assert torch.equal(k, cached_k) and torch.equal(v, cached_v)
        assert k.data_ptr() != cached_k.data_ptr(), "a snapshot must be a copy"


# --------------------------------------------------------------------------------------------
# compare_recoveries on a real failure


@pytest.fixture(scope="module")
def compared(tiny_checkpoint):
    """compare_recoveries of every strategy (2 repeats) after Device-1 of 4 crashes, hidden states and
    replication on; the failure-free run (tokens, logits, KV) comes from the same model before."""
    model = new_tiny_model(tiny_checkpoint)
    try:
        reference = failure_free_run(model, PROMPT, 5, 2)  # the failure strikes the step after 2 tokens
        tokens = reference.tokens
        model.enable_hidden_states()
        model.enable_replication()
        model.prefill(PROMPT)
        model.decode(tokens[0])
        model.arm(FailurePlan(1, 2))
        with pytest.raises(StepAbandoned):
            model.decode(tokens[1])
        event = model.wait_for_failure()
        post, _ = model.prepare_recovery([event], make_strategy("random", 0))
        outcomes = compare_recoveries(model, post, list(STRATEGIES), 2, reference, 2, tokens[1])
        return {"post": post, "outcomes": outcomes, "reference": reference, "repeats": 2}
    finally:
        model.close()


def test_compare_recoveries_times_checks_and_costs_every_strategy(compared):
    post, outcomes, reference = compared["post"], compared["outcomes"], compared["reference"]
    assert post.context_ids.tolist() == PROMPT + reference.tokens[:1]
    assert len(set(reference.tokens[2:])) > 1, "a degenerate continuation would prove nothing"
    by_name = {o.name: o for o in outcomes}
    assert list(by_name) == list(STRATEGIES)
    for o in outcomes:
        assert o.error is None, (o.name, o.error)
        assert len(o.timing.seconds) == compared["repeats"]
        assert o.kv.ok, (o.name, o.kv.describe())
        assert o.kv.kept_max_abs_diff == 0.0 and o.kv.tolerance == REBUILT_KV_TOLERANCE[torch.float32]
        assert o.logits_max_rel_diff <= o.logits_tolerance == LOGITS_TOLERANCE[torch.float32]
        assert o.lossless and o.verdict() == "lossless"
        assert len(o.continuation) == 3 and o.redo_s > 0
    assert by_name["replicate"].kv.rebuilt_max_rel_error == 0.0  # a promoted copy is the same bits
    assert by_name["full-recompute"].reuse_rate == 0.0
    assert all(by_name[n].reuse_rate == 0.75 for n in ("reuse-replay", "reuse-hidden", "replicate"))
    flops = [by_name[n].flops for n in ("full-recompute", "reuse-replay", "reuse-hidden", "replicate")]
    assert flops[0] > flops[1] > flops[2] > flops[3] == 0.0
    assert by_name["full-recompute"].kept_bytes == by_name["reuse-replay"].kept_bytes == 0
    shard, context = post.survivors[0].shard, post.context_ids.numel()  # what the stores held at the failure
    hidden, itemsize = shard.layers[0].wqkv.shape[1], shard.layers[0].wqkv.element_size()
    per_survivor = len(shard.layers) * context * hidden * itemsize
    assert by_name["reuse-hidden"].kept_bytes == per_survivor * len(post.survivors)
    assert by_name["replicate"].kept_bytes > 0


def test_compare_recoveries_checks_every_strategys_continuation_from_the_failure_point(compared):
    """Each strategy's continuation starts at the failure point, not where the previous strategy's ended."""
    tail = compared["reference"].tokens[2:]
    wrong = {o.name: o.continuation for o in compared["outcomes"] if o.continuation != tail or not o.lossless}
    assert not wrong, f"failure-free tokens {tail}, continuations {wrong}"


def test_a_recovery_that_keeps_the_argmax_but_shifts_the_logits_is_not_lossless(compared):
    """The verdict reads the logits, not only the tokens: 1% of the scale added to one logit keeps every
    argmax (the tokens stay identical) and fails."""
    outcome = compared["outcomes"][0]
    shifted = StrategyOutcome(outcome.name, outcome.keeps, outcome.timing, outcome.flops, outcome.reuse_rate,
                              outcome.kept_bytes, kv=outcome.kv, logits_max_rel_diff=0.01,
                              logits_tolerance=outcome.logits_tolerance, continuation=outcome.continuation,
                              tokens_identical=True, redo_s=outcome.redo_s)
    assert not shifted.lossless
    assert "logits off by 0.01" in shifted.verdict()


def test_a_different_token_is_a_loss_unless_the_failure_free_run_had_a_near_tie_there(compared):
    outcome = compared["outcomes"][0]

    def with_tokens(identical: bool, near_tie_mismatches: tuple[int, ...]) -> StrategyOutcome:
        return StrategyOutcome(outcome.name, outcome.keeps, outcome.timing, outcome.flops, outcome.reuse_rate,
                               outcome.kept_bytes, kv=outcome.kv, logits_max_rel_diff=outcome.logits_max_rel_diff,
                               logits_tolerance=outcome.logits_tolerance, tokens_identical=identical,
                               near_tie_mismatches=near_tie_mismatches, redo_s=outcome.redo_s)
    assert with_tokens(True, ()).lossless
    assert with_tokens(False, (2,)).lossless  # a flipped near-tie is rounding
    different = with_tokens(False, ())
    assert not different.lossless and "tokens after the recovery differ" in different.verdict()


# --------------------------------------------------------------------------------------------
# The cost in normal running


@pytest.mark.parametrize("replication", [False, True])
def test_keeping_cost_gives_three_modes_for_prefill_and_decode_and_restores_the_settings(tiny_model, replication):
    model = tiny_model
    model.enable_hidden_states()
    if replication:
        model.enable_replication()
    model.generate(PROMPT, 2)
    stores = {d: w.state.hidden_states for d, w in model.workers.items()}
    cost = measure_keeping_cost(model, decode_repeats=3, prefill_repeats=2)
    assert set(cost.decode) == set(cost.prefill) == {"nothing kept", "hidden states", "KV replica"}
    assert all(len(t.seconds) == 3 and t.min > 0 for t in cost.decode.values())
    assert all(len(t.seconds) == 2 and t.min > 0 for t in cost.prefill.values())
    assert model.replication is replication
    assert all(w.state.hidden_states is stores[d] for d, w in model.workers.items())


def test_keeping_cost_without_hidden_states_keeps_them_off(tiny_model):
    model = tiny_model
    model.generate(PROMPT, 2)
    cost = measure_keeping_cost(model, decode_repeats=2, prefill_repeats=0)
    assert set(cost.decode) == {"nothing kept", "KV replica"} and cost.prefill == {}
    assert all(len(t.seconds) == 2 for t in cost.decode.values())
    assert model.replication is False
    assert all(w.state.hidden_states is None for w in model.workers.values())


def test_keeping_cost_leaves_the_cache_as_it_was(tiny_model):
    model = tiny_model
    model.enable_hidden_states()
    generated = model.generate(PROMPT, 4)
    model.generate(PROMPT, 3)  # the cache holds PROMPT + 2 tokens; the third is still to be fed
    cached = list(model.cached_ids)
    kv = snapshot_kv(model)
    measure_keeping_cost(model, decode_repeats=1, prefill_repeats=1)
    assert model.cached_ids == cached
    assert all(w.state.cache.length == len(cached) for w in model.workers.values())
    # the same values up to rounding: a prefill sums the positions that decode steps filled in another order
    assert check_kv(snapshot_kv(model), kv, frozenset(), torch.float32).ok
    # and generation goes on as if nothing had been measured
    assert int(model.decode(generated[2]).argmax()) == generated[3]
