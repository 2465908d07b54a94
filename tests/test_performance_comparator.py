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
from performance_comparator import (KV_TOLERANCE, StrategyOutcome, Timing, compare_recoveries, forward_flops,
                                    kv_error, measure_step_overhead, recovery_flops, reuse_rate, snapshot_kv,
                                    time_strategies)
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


def outcome(name: str, seconds: tuple[float, ...] | None, flops: float) -> StrategyOutcome:
    return StrategyOutcome(name, "nothing", Timing(seconds) if seconds else None, flops, 0.0, 0,
                           kv_max_error=0.0, kv_tolerance=1.0, tokens_identical=True)


def test_comparison_rows_speedup_is_the_ratio_of_medians():
    rows = demo.comparison_rows([outcome("full-recompute", (3.0, 1.0, 2.0), 100.0),
                                 outcome("reuse-replay", (1.0, 0.5, 0.25), 97.0),
                                 outcome("replicate", (0.1, 0.2, 0.4), 0.0)])
    by_name = {r["name"]: r for r in rows}
    assert by_name["full-recompute"]["speedup"] == pytest.approx(1.0)
    assert by_name["reuse-replay"]["speedup"] == pytest.approx(2.0 / 0.5)
    assert by_name["replicate"]["speedup"] == pytest.approx(2.0 / 0.2)
    assert by_name["reuse-replay"]["flop_ratio"] == pytest.approx(100.0 / 97.0)
    assert by_name["replicate"]["flop_ratio"] == float("inf")
    assert by_name["reuse-replay"]["median_s"] == 0.5 and by_name["reuse-replay"]["min_s"] == 0.25


def test_comparison_rows_without_the_baseline_give_no_ratio():
    (row,) = demo.comparison_rows([outcome("reuse-hidden", (0.1,), 5.0)])
    assert row["speedup"] is None and row["flop_ratio"] is None


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
# The KV check


def test_kv_error_is_zero_for_identical_kv_and_catches_one_wrong_entry(tiny_model):
    tiny_model.generate(PROMPT, 3)
    states = {d: w.state for d, w in tiny_model.workers.items()}
    reference = snapshot_kv(tiny_model)
    worst, scale = kv_error(states, reference)
    assert worst == 0.0 and scale > 0
    for which in (0, 1):  # K, then V
        layer, g = tiny_model.config.num_hidden_layers - 1, tiny_model.config.num_key_value_heads - 1
        wrong = {key: tuple(t.clone() for t in kv) for key, kv in reference.items()}
        wrong[(layer, g)][which][-1, 5] += 1.0
        worst, _ = kv_error(states, wrong)
        assert worst >= 1.0 - 1e-6, worst
    shorter = {key: (k[:-1], v[:-1]) for key, (k, v) in reference.items()}
    assert kv_error(states, shorter)[0] == float("inf")


# --------------------------------------------------------------------------------------------
# compare_recoveries on a real failure


@pytest.fixture(scope="module")
def compared(tiny_checkpoint):
    """compare_recoveries of every strategy (2 repeats) after Device-1 of 4 crashes, hidden states and
    replication on; the failure-free tokens and KV come from the same model before the failure."""
    model = new_tiny_model(tiny_checkpoint)
    try:
        tokens = [int(model.prefill(PROMPT).argmax())]
        tokens.append(int(model.decode(tokens[0]).argmax()))
        reference_kv = snapshot_kv(model)  # the failure strikes the step after 2 tokens: PROMPT + 1 token cached
        while len(tokens) < 5:
            tokens.append(int(model.decode(tokens[-1]).argmax()))
        model.enable_hidden_states()
        model.replication = True
        model.prefill(PROMPT)
        model.decode(tokens[0])
        model.arm(FailurePlan(1, 2))
        with pytest.raises(StepAbandoned):
            model.decode(tokens[1])
        event = model.wait_for_failure()
        post, _ = model.prepare_recovery([event], make_strategy("random", 0))
        outcomes = compare_recoveries(model, post, list(STRATEGIES), 2, reference_kv, tokens[2:], tokens[1])
        return {"post": post, "outcomes": outcomes, "tokens": tokens, "reference_kv": reference_kv, "repeats": 2}
    finally:
        model.close()


def test_compare_recoveries_times_checks_and_costs_every_strategy(compared):
    post, outcomes, reference_kv = compared["post"], compared["outcomes"], compared["reference_kv"]
    assert post.context_ids.tolist() == PROMPT + compared["tokens"][:1]
    assert len(set(compared["tokens"][2:])) > 1, "a degenerate continuation would prove nothing"
    by_name = {o.name: o for o in outcomes}
    assert list(by_name) == list(STRATEGIES)
    scale = max(max(k.abs().max().item(), v.abs().max().item()) for k, v in reference_kv.values())
    for o in outcomes:
        assert o.error is None, (o.name, o.error)
        assert len(o.timing.seconds) == compared["repeats"]
        assert o.kv_tolerance == pytest.approx(KV_TOLERANCE[torch.float32] * scale)
        assert o.kv_lossless, (o.name, o.kv_max_error)
        assert len(o.continuation) == 3
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
    # the first strategy checked continues from the right place
    first = outcomes[0]
    assert first.continuation == compared["tokens"][2:] and first.lossless


def test_compare_recoveries_checks_every_strategys_continuation_from_the_failure_point(compared):
    """Each strategy's continuation starts at the failure point, not where the previous strategy's ended."""
    tail = compared["tokens"][2:]
    wrong = {o.name: o.continuation for o in compared["outcomes"] if o.continuation != tail or not o.lossless}
    assert not wrong, f"failure-free tokens {tail}, continuations {wrong}"


# --------------------------------------------------------------------------------------------
# The cost in normal running


@pytest.mark.parametrize("replication", [False, True])
def test_measure_step_overhead_gives_three_modes_and_restores_the_settings(tiny_model, replication):
    model = tiny_model
    model.enable_hidden_states()
    model.replication = replication
    model.generate(PROMPT, 2)
    stores = {d: w.state.hidden_states for d, w in model.workers.items()}
    timings = measure_step_overhead(model, repeats=3)
    assert set(timings) == {"nothing kept", "hidden states", "KV replica"}
    assert all(len(t.seconds) == 3 and t.min > 0 for t in timings.values())
    assert model.replication is replication
    assert all(w.state.hidden_states is stores[d] for d, w in model.workers.items())


def test_measure_step_overhead_without_hidden_states_keeps_them_off(tiny_model):
    model = tiny_model
    model.generate(PROMPT, 2)
    timings = measure_step_overhead(model, repeats=2)
    assert set(timings) == {"nothing kept", "KV replica"}
    assert all(len(t.seconds) == 2 for t in timings.values())
    assert model.replication is False
    assert all(w.state.hidden_states is None for w in model.workers.values())


def test_measure_step_overhead_leaves_the_cache_as_it_was(tiny_model):
    model = tiny_model
    model.enable_hidden_states()
    generated = model.generate(PROMPT, 4)
    model.generate(PROMPT, 3)  # the cache holds PROMPT + 2 tokens; the third is still to be fed
    cached = list(model.cached_ids)
    kv = snapshot_kv(model)
    measure_step_overhead(model, repeats=1)
    assert model.cached_ids == cached
    assert all(w.state.cache.length == len(cached) for w in model.workers.values())
    assert kv_error({d: w.state for d, w in model.workers.items()}, kv)[0] == 0.0
    # and generation goes on as if nothing had been measured
    assert int(model.decode(generated[2]).argmax()) == generated[3]
