"""Specifications for moving a failed device's heads and MLP columns to the survivors."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from head_assignment import Assignment, custom_assignment, initial_assignment
from task_reassign import (
    STRATEGIES,
    BalancedReassign,
    RandomReassign,
    ReassignmentPlan,
    make_strategy,
    max_load,
)

INTERMEDIATE = 8192


def seed_scenario() -> Assignment:
    """Llama-3.2-1B over four devices: Device-1 holds heads 9-16 (0-based 8-15), MLP 2048..4096."""
    return initial_assignment(num_heads=32, num_kv_heads=8, intermediate_size=INTERMEDIATE, num_devices=4)


def smollm2_like() -> Assignment:
    """9 heads, 3 KV heads over four devices: heads split 3, 2, 2, 2, so groups already straddle devices."""
    return initial_assignment(num_heads=9, num_kv_heads=3, intermediate_size=1536, num_devices=4)


def only_receiver(plan: ReassignmentPlan) -> int:
    (receiver,) = plan.receivers
    return receiver


# --- the seed scenario: random -------------------------------------------------------------------

def test_random_sends_all_lost_heads_to_one_survivor():
    plan = RandomReassign(seed=0).plan(seed_scenario(), failed=1)
    receiver = only_receiver(plan)
    assert receiver in (0, 2, 3)
    assert plan.moved_heads[receiver] == tuple(range(8, 16))
    assert plan.after.heads[receiver] == tuple(sorted(seed_scenario().heads[receiver] + tuple(range(8, 16))))
    assert max_load(plan.after) == 16


def test_random_picks_the_same_survivor_for_the_same_seed():
    for seed in range(5):
        first = RandomReassign(seed).plan(seed_scenario(), failed=1)
        second = make_strategy("random", seed).plan(seed_scenario(), failed=1)
        assert first.receivers == second.receivers
        assert first.after == second.after


def test_random_choice_varies_across_seeds():
    picked = {only_receiver(RandomReassign(seed).plan(seed_scenario(), failed=1)) for seed in range(20)}
    assert len(picked) > 1
    assert picked <= {0, 2, 3}


def test_random_receiver_gets_the_whole_mlp_slice():
    plan = RandomReassign(seed=3).plan(seed_scenario(), failed=1)
    receiver = only_receiver(plan)
    assert plan.moved_mlp[receiver] == ((2048, 4096),)
    assert plan.after.mlp_width(receiver) == 2 * 2048


def test_random_receiver_must_rebuild_kv_heads_2_and_3():
    plan = RandomReassign(seed=0).plan(seed_scenario(), failed=1)
    assert plan.lost_kv_heads == (2, 3)
    assert plan.kv_to_rebuild[only_receiver(plan)] == (2, 3)


def test_random_successive_failures_are_reproducible_from_the_seed():
    def survivors_after_two_failures(seed: int) -> Assignment:
        strategy = RandomReassign(seed)
        first = strategy.plan(seed_scenario(), failed=1)
        return strategy.plan(first.after, failed=first.after.devices[0]).after

    assert survivors_after_two_failures(7) == survivors_after_two_failures(7)


# --- the seed scenario: balanced -----------------------------------------------------------------

def test_balanced_sends_kv_groups_2_and_3_to_two_different_survivors():
    plan = BalancedReassign().plan(seed_scenario(), failed=1)
    assert len(plan.receivers) == 2
    assert sorted(plan.moved_heads.values()) == [tuple(range(8, 12)), tuple(range(12, 16))]
    assert plan.moved_heads == {0: tuple(range(8, 12)), 2: tuple(range(12, 16))}  # ties -> lowest id


def test_balanced_max_load_is_12_where_random_makes_16():
    assert max_load(BalancedReassign().plan(seed_scenario(), failed=1).after) == 12
    assert max_load(RandomReassign(seed=0).plan(seed_scenario(), failed=1).after) == 16


def test_balanced_keeps_each_lost_kv_group_whole():
    plan = BalancedReassign().plan(seed_scenario(), failed=1)
    for kv_head in plan.lost_kv_heads:
        takers = {r for r, heads in plan.moved_heads.items() if any(h // 4 == kv_head for h in heads)}
        assert len(takers) == 1


def test_balanced_cuts_the_mlp_slice_in_proportion_to_heads_taken():
    plan = BalancedReassign().plan(seed_scenario(), failed=1)
    assert plan.moved_mlp == {0: ((2048, 3072),), 2: ((3072, 4096),)}
    assert plan.after.mlp[0] == ((0, 3072),)          # adjacent ranges merged
    assert plan.after.mlp[2] == ((3072, 6144),)


def test_balanced_each_receiver_rebuilds_only_its_own_kv_group():
    plan = BalancedReassign().plan(seed_scenario(), failed=1)
    assert plan.kv_to_rebuild == {0: (2,), 2: (3,)}


def test_balanced_ties_prefer_a_survivor_already_holding_the_kv_head():
    # Device-1 holds KV head 0 (head 0); Device-0 holds KV head 1 (head 2); Device-2 fails with one of each.
    assignment = custom_assignment({0: (2,), 1: (0,), 2: (1, 3)}, num_heads=4, num_kv_heads=2, intermediate_size=12)
    plan = BalancedReassign().plan(assignment, failed=2)
    assert plan.moved_heads == {0: (3,), 1: (1,)}
    assert plan.kv_to_rebuild == {0: (), 1: ()}


def test_balanced_places_the_largest_lost_group_first():
    # Device-2 loses groups of sizes 1, 1, 2 (KV heads 0, 1, 2); survivors hold one head each.
    # Smallest-first would end at loads 4 and 2; largest-first ends at 3 and 3.
    assignment = custom_assignment({0: (0,), 1: (2,), 2: (1, 3, 4, 5)}, num_heads=6, num_kv_heads=3,
                                   intermediate_size=12)
    plan = BalancedReassign().plan(assignment, failed=2)
    assert plan.moved_heads == {0: (4, 5), 1: (1, 3)}
    assert max_load(plan.after) == 3


def test_mlp_cut_with_uneven_head_counts_adds_up_exactly():
    # 3 lost heads of 3 groups over two equally loaded survivors: 2 heads vs 1 head, 10 columns.
    assignment = custom_assignment({0: (0, 1, 2), 1: (3,), 2: (4,)}, num_heads=5, num_kv_heads=5, intermediate_size=30)
    plan = BalancedReassign().plan(assignment, failed=0)
    assert plan.moved_heads == {1: (0, 2), 2: (1,)}
    assert plan.moved_mlp == {1: ((0, 6),), 2: ((6, 10),)}
    assert plan.after.mlp == {1: ((0, 6), (10, 20)), 2: ((6, 10), (20, 30))}


# --- SmolLM2-like: 9 heads, 3 KV heads, 4 devices ------------------------------------------------

@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("failed", range(4))
def test_smollm2_every_failed_device_can_be_reassigned(name, failed):
    plan = make_strategy(name, seed=failed).plan(smollm2_like(), failed)
    assert sorted(h for hs in plan.after.heads.values() for h in hs) == list(range(9))
    assert failed not in plan.after.devices
    assert sum(plan.after.mlp_width(d) for d in plan.after.devices) == 1536


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("failed", range(4))
def test_smollm2_duplicated_kv_heads_lists_every_kv_head_with_two_holders(name, failed):
    plan = make_strategy(name).plan(smollm2_like(), failed)
    holders = {g: tuple(d for d in plan.after.devices if g in plan.after.kv_heads(d)) for g in range(3)}
    assert plan.duplicated_kv_heads() == {g: ds for g, ds in holders.items() if len(ds) > 1}


@pytest.mark.parametrize("seed", range(10))
def test_smollm2_random_receiver_ends_up_sharing_a_kv_head_with_another_device(seed):
    # Device-2 (heads 5, 6) reads KV heads 1 and 2, also read by Device-1 and Device-3.
    plan = RandomReassign(seed).plan(smollm2_like(), failed=2)
    receiver = only_receiver(plan)
    assert any(receiver in holders for holders in plan.duplicated_kv_heads().values())


def test_smollm2_balanced_returns_each_split_group_to_its_other_holder():
    plan = BalancedReassign().plan(smollm2_like(), failed=2)
    assert plan.moved_heads == {1: (5,), 3: (6,)}
    assert plan.kv_to_rebuild == {1: (), 3: ()}
    assert plan.duplicated_kv_heads() == {}


# --- successive failures -------------------------------------------------------------------------

@pytest.mark.parametrize("name", STRATEGIES)
def test_successive_failures_leave_one_survivor_holding_everything(name):
    strategy = make_strategy(name, seed=1)
    assignment = seed_scenario()
    for failed in (1, 3, 0):
        assignment = strategy.plan(assignment, failed).after
    assert assignment.devices == (2,)
    assert assignment.heads[2] == tuple(range(32))
    assert assignment.mlp[2] == ((0, INTERMEDIATE),)
    assert assignment.kv_heads(2) == tuple(range(8))


@pytest.mark.parametrize("name", STRATEGIES)
def test_second_failure_moves_heads_gained_in_the_first(name):
    strategy = make_strategy(name, seed=0)
    first = strategy.plan(seed_scenario(), failed=1)
    receiver = first.receivers[0]
    second = strategy.plan(first.after, failed=receiver)
    moved = sorted(h for hs in second.moved_heads.values() for h in hs)
    assert moved == list(first.after.heads[receiver])
    assert set(first.moved_heads[receiver]) <= set(moved)


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", STRATEGIES)
def test_failing_a_device_not_in_the_assignment_raises(name):
    with pytest.raises(ValueError, match="Device-9 is not in the assignment"):
        make_strategy(name).plan(seed_scenario(), failed=9)


@pytest.mark.parametrize("name", STRATEGIES)
def test_failing_a_device_already_failed_raises(name):
    after = make_strategy(name).plan(seed_scenario(), failed=1).after
    with pytest.raises(ValueError, match="Device-1"):
        make_strategy(name).plan(after, failed=1)


@pytest.mark.parametrize("name", STRATEGIES)
def test_failing_the_only_device_raises(name):
    single = initial_assignment(num_heads=32, num_kv_heads=8, intermediate_size=INTERMEDIATE, num_devices=1)
    with pytest.raises(ValueError, match="only device"):
        make_strategy(name).plan(single, failed=0)


def test_unknown_strategy_name_raises_naming_the_choices():
    with pytest.raises(ValueError, match=r"unknown reassignment strategy 'nope' \(choose from random, balanced\)"):
        make_strategy("nope")


def test_make_strategy_returns_strategies_with_their_names():
    assert [make_strategy(name).name for name in STRATEGIES] == ["random", "balanced"]


# --- describe ------------------------------------------------------------------------------------

def test_describe_random_seed_scenario_names_receiver_heads_kv_and_mlp():
    plan = RandomReassign(seed=0).plan(seed_scenario(), failed=1)
    receiver = only_receiver(plan)
    lines = plan.describe()
    assert f"Device-{receiver} takes heads 9-16 (KV heads 3-4 to rebuild), MLP columns 2048-4096" in lines
    assert "Device-1 failed" in lines[0]


def test_describe_mentions_every_receiver_and_the_kv_heads_it_rebuilds():
    plan = BalancedReassign().plan(seed_scenario(), failed=1)
    text = "\n".join(plan.describe())
    assert "Device-0 takes heads 9-12 (KV head 3 to rebuild), MLP columns 2048-3072" in text
    assert "Device-2 takes heads 13-16 (KV head 4 to rebuild), MLP columns 3072-4096" in text


def test_describe_says_when_no_kv_head_is_held_twice():
    plan = BalancedReassign().plan(seed_scenario(), failed=1)
    assert plan.describe()[-1] == "no KV head is held twice"


def test_describe_lists_kv_heads_held_twice_and_receivers_with_nothing_to_rebuild():
    plan = BalancedReassign().plan(smollm2_like(), failed=1)   # heads 4-5 read KV head 2, which Device-2 holds
    lines = plan.describe()
    assert "Device-2 takes heads 4-5 (no KV head to rebuild), MLP columns 384-768" in lines
    assert lines[-1] == "KV heads held twice: KV head 3 on Device-2, Device-3"


# --- invariants ----------------------------------------------------------------------------------

@st.composite
def assignments(draw) -> Assignment:
    group_size = draw(st.sampled_from([1, 2, 3, 4]))
    num_kv_heads = draw(st.integers(1, 8))
    num_heads = group_size * num_kv_heads
    num_devices = draw(st.integers(1, min(8, num_heads)))
    intermediate = draw(st.integers(num_devices, 200))
    return initial_assignment(num_heads, num_kv_heads, intermediate, num_devices)


def assert_plan_invariants(plan: ReassignmentPlan) -> None:
    before, after = plan.before, plan.after
    num_heads = sum(len(hs) for hs in before.heads.values())
    owners = sorted(h for hs in after.heads.values() for h in hs)
    assert owners == list(range(num_heads)), "every query head has exactly one owner"

    intermediate = max(stop for rs in before.mlp.values() for _, stop in rs)
    ranges = sorted(r for rs in after.mlp.values() for r in rs if r[1] > r[0])
    assert [start for start, _ in ranges] == [0] + [stop for _, stop in ranges[:-1]], "no gap, no overlap"
    assert ranges[-1][1] == intermediate
    moved_widths = sum(stop - start for rs in plan.moved_mlp.values() for start, stop in rs)
    assert moved_widths == before.mlp_width(plan.failed)

    for device in after.devices:
        needed = {h // after.group_size for h in after.heads[device]}
        assert needed <= set(after.kv_heads(device)), "every KV head a device reads is held"
    assert set(plan.kv_to_rebuild) == set(plan.moved_heads)
    for receiver in plan.receivers:
        assert set(plan.kv_to_rebuild[receiver]) == set(after.kv_heads(receiver)) - set(before.kv_heads(receiver))
    assert plan.lost_kv_heads == before.kv_heads(plan.failed)


@settings(max_examples=150, deadline=None)
@given(assignment=assignments(), seed=st.integers(0, 1000), data=st.data())
def test_invariants_hold_over_any_sequence_of_failures(assignment, seed, data):
    randomly, balanced = RandomReassign(seed), BalancedReassign()
    while len(assignment.devices) > 1:
        failed = data.draw(st.sampled_from(assignment.devices), label="failed")
        by_random = randomly.plan(assignment, failed)
        by_balance = balanced.plan(assignment, failed)
        assert_plan_invariants(by_random)
        assert_plan_invariants(by_balance)
        assert len(by_random.receivers) == 1
        assert max_load(by_balance.after) <= max_load(by_random.after)
        assignment = data.draw(st.sampled_from([by_random.after, by_balance.after]), label="continue with")
    last = assignment.devices[0]
    assert len(assignment.mlp[last]) == 1, "the last survivor holds [0, intermediate) as one merged range"
    with pytest.raises(ValueError):
        balanced.plan(assignment, last)
