"""Specifications for performance_comparator.py: timings, FLOP counts, reuse rates, KV checks.

FLOP figures are checked on the real Llama-3.2-1B shapes (docs/design.md) with shape-only
post-failure states (what survivors would report, without weights); what needs a model runs on the
tiny preset, asking the devices for everything.
"""
from __future__ import annotations

import statistics

import pytest
import torch

import demo_scenario
import execution_optimization_algorithm_demo as demo
import performance_comparator
from cluster_leader import PostFailure, Recovery, StepFailed
from device_protocol import DeviceInfo, RecoveryPolicy
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama
from head_assignment import even_assignment
from heartbeat_detection import HeartbeatConfig
from kv_cache_reused import STRATEGIES
from llama_model_loader import Checkpoint
from lossless_checks import LOGITS_TOLERANCE, REBUILT_KV_TOLERANCE, KVCheck, check_kv
from performance_comparator import (StrategyOutcome, Timing, compare_recoveries, failure_free_run, forward_flops,
                                    measure_keeping_cost, recovery_flops, reuse_rate)
from synthetic_checkpoint import preset_config
from task_reassign import make_strategy

HEARTBEAT = HeartbeatConfig(interval_s=0.05, timeout_s=0.5)  # short, with room for a loaded 2-core machine
PROMPT = [256] + [(29 * i + 3) % 250 for i in range(19)]
CONFIG_1B = preset_config("llama-3.2-1b")
CONFIG_TINY = preset_config("tiny")
CONTEXT = 512


# --------------------------------------------------------------------------------------------
# Timing


def test_timing_min_median_max():
    t = Timing((0.3, 0.1, 0.5, 0.2))
    assert (t.min, t.median, t.max) == (0.1, 0.25, 0.5)
    assert Timing((2.0,)).median == 2.0
    assert Timing((0.4, 0.1, 0.2)).median == 0.2


class FakeModel:
    """Answers `rebuild(name)` as the leader would: a Recovery timed at `seconds[name]`, or the fallback's
    when `name` is impossible; records the order of the calls."""

    config = preset_config("llama-3.2-1b")

    def __init__(self, seconds: dict[str, float], impossible: set[str] = frozenset()):
        self.seconds, self.impossible, self.calls = seconds, impossible, []

    def rebuild(self, name: str) -> Recovery:
        self.calls.append(name)
        if name in self.impossible:
            return Recovery((), (), "full-recompute", f"{name} impossible (cannot); fell back to full-recompute",
                            0.0, 9.9, 1, 25)
        return Recovery((), (), name, None, 0.0, self.seconds[name], 1, 25)


def fake_post() -> PostFailure:
    return shape_only_post("random", context=25)


def new_tiny_model(tiny_checkpoint, hold: bool = False) -> FaultTolerantLlama:
    """A FaultTolerantLlama on the tiny checkpoint: 4 devices, fp32, short heartbeats (the caller closes it)."""
    checkpoint = Checkpoint(tiny_checkpoint)
    return FaultTolerantLlama(checkpoint, even_assignment(checkpoint.config, 4), torch.float32, heartbeat=HEARTBEAT,
                              policy=RecoveryPolicy(hold=hold))


@pytest.fixture
def tiny_model(tiny_checkpoint):
    model = new_tiny_model(tiny_checkpoint)
    try:
        yield model
    finally:
        model.close()


def test_strategies_alternate_with_the_order_rotated_and_are_checked_after_their_last_run(monkeypatch):
    checked = []
    monkeypatch.setattr(performance_comparator, "check", lambda model, outcome, *rest: checked.append(outcome.name))
    model = FakeModel({"full-recompute": 3.0, "reuse-replay": 2.0, "replicate": 0.1})
    outcomes = compare_recoveries(model, fake_post(), ["full-recompute", "reuse-replay", "replicate"], 4, None, 2, 7)
    assert model.calls == ["full-recompute", "reuse-replay", "replicate", "reuse-replay", "replicate", "full-recompute",
                           "replicate", "full-recompute", "reuse-replay", "full-recompute", "reuse-replay",
                           "replicate"]  # rotated each round
    assert checked == ["full-recompute", "reuse-replay", "replicate"]  # in the last round
    by_name = {o.name: o for o in outcomes}
    assert by_name["reuse-replay"].timing.seconds == (2.0,) * 4  # the leader's own timing of each rebuild


def test_an_impossible_strategy_is_run_once_reported_and_not_timed(monkeypatch):
    monkeypatch.setattr(performance_comparator, "check", lambda *args: None)
    model = FakeModel({"full-recompute": 3.0, "replicate": 0.1}, impossible={"replicate"})
    outcomes = compare_recoveries(model, fake_post(), ["full-recompute", "replicate"], 3, None, 2, 7)
    by_name = {o.name: o for o in outcomes}
    assert model.calls.count("replicate") == 1
    assert by_name["replicate"].error == "replicate impossible (cannot)" and by_name["replicate"].timing is None
    assert len(by_name["full-recompute"].timing.seconds) == 3


# --------------------------------------------------------------------------------------------
# Ratios come from the comparison's own timings


def outcome(name: str, seconds: tuple[float, ...] | None, flops: float, redo_s: float = 0.5) -> StrategyOutcome:
    return StrategyOutcome(name, "nothing", Timing(seconds) if seconds else None, flops, 0.0, 0,
                           kv=KVCheck(0.0, 0.0, 1e-4), logits_max_rel_diff=0.0, logits_tolerance=1e-4,
                           tokens_identical=True, redo_s=redo_s)


SHARED = {"detection_s": 5.0, "regroup_s": 0.02, "weights_s": 1.0}  # phases every strategy shares


def test_comparison_rows_speedup_is_the_ratio_of_medians():
    rows = demo_scenario.comparison_rows([outcome("full-recompute", (3.0, 1.0, 2.0), 100.0),
                                 outcome("reuse-replay", (1.0, 0.5, 0.25), 97.0),
                                 outcome("replicate", (0.1, 0.2, 0.4), 0.0)], SHARED)
    by_name = {r["name"]: r for r in rows}
    assert by_name["full-recompute"]["speedup"] == pytest.approx(1.0)
    assert by_name["reuse-replay"]["speedup"] == pytest.approx(2.0 / 0.5)
    assert by_name["replicate"]["speedup"] == pytest.approx(2.0 / 0.2)
    assert by_name["reuse-replay"]["flop_ratio"] == pytest.approx(100.0 / 97.0)
    assert by_name["replicate"]["flop_ratio"] is None  # strict JSON: null, with the reason beside it
    assert "no FLOPs" in by_name["replicate"]["flop_ratio_note"] and by_name["reuse-replay"]["flop_ratio_note"] is None
    assert by_name["reuse-replay"]["median_s"] == 0.5 and by_name["reuse-replay"]["min_s"] == 0.25


def test_comparison_rows_without_the_baseline_give_no_ratio():
    (row,) = demo_scenario.comparison_rows([outcome("reuse-hidden", (0.1,), 5.0)], SHARED)
    assert row["speedup"] is None and row["flop_ratio"] is None and row["interruption_ratio"] is None
    assert row["interruption_s"] == pytest.approx(5.0 + 0.02 + 1.0 + 0.1 + 0.5)


def test_the_whole_interruption_is_detection_regroup_weights_rebuild_and_redo():
    shared = {"detection_s": 4.0, "regroup_s": 0.05, "weights_s": 1.5}
    rows = demo_scenario.comparison_rows([outcome("full-recompute", (3.0, 1.0, 2.0), 100.0, redo_s=0.25),
                                 outcome("replicate", (0.1, 0.2, 0.4), 0.0, redo_s=0.5)], shared)
    by_name = {r["name"]: r for r in rows}
    assert by_name["replicate"]["interruption_phases"] == {**shared, "rebuild_s": 0.2, "redo_s": 0.5}
    assert by_name["full-recompute"]["interruption_s"] == pytest.approx(4.0 + 0.05 + 1.5 + 2.0 + 0.25)
    assert by_name["replicate"]["interruption_s"] == pytest.approx(4.0 + 0.05 + 1.5 + 0.2 + 0.5)
    assert by_name["replicate"]["interruption_ratio"] == pytest.approx(7.8 / 6.25)
    assert by_name["replicate"]["speedup"] == pytest.approx(10.0)  # the rebuild alone: 10x; the whole: 1.25x


def test_the_demo_is_lossless_for_every_strategy_when_no_kv_head_is_shared(tiny_4kv, tmp_path):
    """As on Llama-3.2-1B (8 KV heads over 4 devices), each device holds KV heads no other holds: the
    lost ones survive only in the buddy's copy or the hidden states, and every strategy in turn
    starts from the same post-failure state."""
    from conftest import TINY_DEMO_ARGS
    options = demo.parse_args(["--model-dir", str(tiny_4kv.folder), *TINY_DEMO_ARGS, "--repeats", "2",
                               "--report", str(tmp_path / "report.txt"), "--quiet"])
    report = demo_scenario.run_scenario(options, lambda line: None)
    verdicts = {row["name"]: row["verdict"] for row in report["comparison"]}
    assert verdicts == {name: "lossless" for name in STRATEGIES}


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
        if row["flops"]:
            assert row["flop_ratio"] == pytest.approx(baseline["flops"] / row["flops"], rel=1e-12), name
        else:
            assert row["flop_ratio"] is None and row["flop_ratio_note"], name


# --------------------------------------------------------------------------------------------
# FLOPs counted from shapes (Llama-3.2-1B, 512-token context, one device of four lost)


def shape_only_post(reassign: str, failed: int = 1, context: int = CONTEXT) -> PostFailure:
    """A post-failure state as the survivors of the real shapes would report it (no weights, no KV)."""
    c = CONFIG_1B
    before = even_assignment(c, 4)
    plan = make_strategy(reassign, 0).plan(before, failed)
    after = plan.after
    survivors = {d: DeviceInfo(d, 1, after.heads[d], before.kv_heads(d), context, after.mlp[d], (0, 1), 0,
                               tuple(range(context)), None, 0, False, None, (), 0, 0) for d in after.devices}
    return PostFailure((), (plan,), after, tuple(range(context)), survivors, 0.0)


def test_full_prefill_of_the_1b_model_is_about_one_teraflop():
    c = CONFIG_1B
    assignment = even_assignment(c, 4)
    flops = forward_flops(c, assignment, CONTEXT)
    assert flops == pytest.approx(1.0e12, rel=0.10)
    # docs/design.md: about 61M multiply-adds per token per layer, most of it the MLP
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
    assert hidden == pytest.approx(8.6e9, rel=0.01)  # docs/design.md: 2 KV heads from checkpoints, about 8.6 GFLOP
    assert full / hidden > 50
    assert recovery_flops("replicate", c, post) == 0.0


@pytest.mark.parametrize("reassign", ["random", "balanced"])
def test_reuse_rate_is_the_share_of_kv_entries_kept(reassign):
    post = shape_only_post(reassign)
    c, plan = CONFIG_1B, post.plans[-1]
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
    snapshot = tiny_model.kv_snapshot()
    config, length = tiny_model.config, tiny_model.position
    expected = {(d, layer, g) for d in tiny_model.assignment.devices for layer in range(config.num_hidden_layers)
                for g in tiny_model.assignment.kv_heads(d)}
    assert set(snapshot) == expected
    assert all(k.shape == v.shape == (length, config.head_dim) for k, v in snapshot.values())
    again = tiny_model.kv_snapshot()
    assert all(torch.equal(again[key][0], kv[0]) for key, kv in snapshot.items())
    assert all(again[key][0].data_ptr() != kv[0].data_ptr() for key, kv in snapshot.items()), "copies, not views"


# --------------------------------------------------------------------------------------------
# compare_recoveries on a real failure


def crash_and_compare(model: FaultTolerantLlama, strategies: list[str], repeats: int) -> dict:
    """The failure-free run (tokens, logits, KV) on `model`, then the same run with hidden states and
    replication kept in which Device-1 crashes in the step after 2 tokens; every strategy compared."""
    reference = failure_free_run(model, PROMPT, 5, 2)
    tokens = reference.tokens
    model.keep(True, True)
    model.prefill(PROMPT)
    model.decode(tokens[0])
    model.arm(FailurePlan(1, 2))
    with pytest.raises(StepFailed):
        model.decode(tokens[1])
    post = model.prepare_recovery()
    outcomes = compare_recoveries(model, post, strategies, repeats, reference, 2, tokens[1])
    return {"post": post, "outcomes": outcomes, "reference": reference, "repeats": repeats}


@pytest.fixture(scope="module")
def compared(tiny_checkpoint):
    """compare_recoveries of every strategy (2 repeats) after Device-1 of 4 crashes."""
    model = new_tiny_model(tiny_checkpoint, hold=True)
    try:
        return crash_and_compare(model, list(STRATEGIES), 2)
    finally:
        model.close()


def test_replicate_promotes_the_copy_as_it_was_at_the_failure_even_after_other_strategies_ran(tiny_4kv):
    """With one KV head per device, the lost head survives only in its buddy's copy. Each rebuild ends
    by re-protecting the survivors (each sends its KV to its new ring successor, replacing the copy
    it held); the next strategy compared must still start from the copies as they were."""
    model = new_tiny_model(tiny_4kv.folder, hold=True)
    try:
        outcomes = {o.name: o for o in crash_and_compare(model, ["full-recompute", "replicate"], 2)["outcomes"]}
    finally:
        model.close()
    replicate = outcomes["replicate"]
    assert replicate.error is None and replicate.lossless, replicate.verdict()
    assert replicate.kv.rebuilt_max_rel_error == 0.0  # the promoted copy: the same bits


def test_compare_recoveries_times_checks_and_costs_every_strategy(compared):
    post, outcomes, reference = compared["post"], compared["outcomes"], compared["reference"]
    assert list(post.context_ids) == PROMPT + reference.tokens[:1]
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
    config, context = CONFIG_TINY, len(post.context_ids)  # what the stores held at the failure
    per_survivor = config.num_hidden_layers * context * config.hidden_size * 4
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
    model.keep(True, replication)
    model.generate(PROMPT, 2)
    cost = measure_keeping_cost(model, decode_repeats=3, prefill_repeats=2)
    assert set(cost.decode) == set(cost.prefill) == {"nothing kept", "hidden states", "KV replica"}
    assert all(len(t.seconds) == 3 and t.min > 0 for t in cost.decode.values())
    assert all(len(t.seconds) == 2 and t.min > 0 for t in cost.prefill.values())
    assert model.keeping == (True, replication)
    infos = model.describe()
    assert all(i.replication is replication for i in infos.values())
    assert all(i.hidden_positions == model.position for i in infos.values())  # the parked store came back whole


def test_keeping_cost_without_hidden_states_keeps_them_off(tiny_model):
    model = tiny_model
    model.generate(PROMPT, 2)
    cost = measure_keeping_cost(model, decode_repeats=2, prefill_repeats=0)
    assert set(cost.decode) == {"nothing kept", "KV replica"} and cost.prefill == {}
    assert all(len(t.seconds) == 2 for t in cost.decode.values())
    assert model.keeping == (False, False)
    assert all(i.hidden_positions is None and not i.replication for i in model.describe().values())


def test_keeping_cost_leaves_the_cache_as_it_was(tiny_model):
    model = tiny_model
    model.keep(True, False)
    generated = model.generate(PROMPT, 4)
    model.generate(PROMPT, 3)  # the cache holds PROMPT + 2 tokens; the third is still to be fed
    cached = list(model.cached_ids)
    kv = model.kv_snapshot()
    measure_keeping_cost(model, decode_repeats=1, prefill_repeats=1)
    assert model.cached_ids == cached
    assert all(list(i.cached_ids) == cached for i in model.describe().values())
    # the same values up to rounding: a prefill sums the positions that decode steps filled in another order
    assert check_kv(model.kv_snapshot(), kv, frozenset(), torch.float32, len(cached)).ok
    # and generation goes on as if nothing had been measured
    assert int(model.decode(generated[2]).argmax()) == generated[3]
