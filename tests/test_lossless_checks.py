"""Specifications for lossless_checks.py: the checks must fail for a recovery that is even slightly wrong.

Unit cases on hand-made KV, then every strategy's real recovery on the tiny preset with one error
planted: a 1% error in one position of one layer of one rebuilt head, and one ulp in a kept head.
"""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from cluster_leader import StepFailed
from device_protocol import RecoveryPolicy
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama
from head_assignment import even_assignment
from heartbeat_detection import HeartbeatConfig
from kv_cache_reused import STRATEGIES
from lossless_checks import (LOGITS_TOLERANCE, REBUILT_KV_TOLERANCE, Divergence, check_kv, first_divergence,
                             kept_heads, logits_rel_diff, near_ties, relative_error)
from performance_comparator import failure_free_run

DTYPE = torch.float32
HEARTBEAT = HeartbeatConfig(interval_s=0.05, timeout_s=0.5)  # short, with room for a loaded 2-core machine
PROMPT = [256] + [(41 * i + 7) % 250 for i in range(19)]
FAIL_AFTER = 2


POSITIONS = 6  # of the hand-made KV


def two_devices_kv(scale_of_small_head: float = 1.0) -> dict:
    """Device-0 holds KV head 0 and Device-1 KV head 1, 2 layers, 6 positions; head 1 of layer 1 scaled."""
    generator = torch.Generator().manual_seed(0)
    kv = {}
    for device, g in ((0, 0), (1, 1)):
        for layer in range(2):
            scale = scale_of_small_head if (g, layer) == (1, 1) else 1.0
            kv[(device, layer, g)] = tuple(torch.randn(POSITIONS, 4, generator=generator) * scale for _ in "KV")
    return kv


def planted(kv: dict, key, tensor: int, change) -> dict:
    """A copy of `kv` with `change` applied to one tensor (0: K, 1: V) of one head."""
    copy = {k: tuple(t.clone() for t in pair) for k, pair in kv.items()}
    change(copy[key][tensor])
    return copy


def one_percent_at_the_largest_entry(t: torch.Tensor) -> None:
    position = t.abs().amax(dim=1).argmax()
    t[position] *= 1.01


def one_ulp(t: torch.Tensor) -> None:
    t[3, 2] = torch.nextafter(t[3, 2], torch.tensor(float("inf")))


# --------------------------------------------------------------------------------------------
# On hand-made KV


def test_identical_kv_passes_with_zero_differences():
    reference = two_devices_kv()
    result = check_kv(reference, reference, kept=frozenset({(0, 0), (1, 1)}), dtype=DTYPE, length=POSITIONS)
    assert result.ok and result.kept_max_abs_diff == 0.0 and result.rebuilt_max_rel_error == 0.0
    assert result.describe() == "lossless"


def test_one_ulp_in_a_kept_head_fails_and_names_the_head():
    reference = two_devices_kv()
    changed = planted(reference, (1, 1, 1), 1, one_ulp)
    result = check_kv(changed, reference, kept=frozenset({(0, 0), (1, 1)}), dtype=DTYPE, length=POSITIONS)
    assert not result.ok and result.kept_max_abs_diff > 0
    assert (result.worst_kept.device, result.worst_kept.layer, result.worst_kept.kv_head,
            result.worst_kept.tensor) == (1, 1, 1, "V")
    assert "kept KV changed: V of KV head 2, layer 1, Device-1" in result.describe()
    # the same ulp in a head that was rebuilt is rounding, within the bound
    assert check_kv(changed, reference, kept=frozenset({(0, 0)}), dtype=DTYPE, length=POSITIONS).ok


@pytest.mark.parametrize("tensor", [0, 1], ids=["K", "V"])
def test_one_percent_in_one_position_of_a_rebuilt_head_fails(tensor):
    reference = two_devices_kv()
    changed = planted(reference, (0, 1, 0), tensor, one_percent_at_the_largest_entry)
    result = check_kv(changed, reference, kept=frozenset(), dtype=DTYPE, length=POSITIONS)
    assert not result.ok
    assert result.rebuilt_max_rel_error == pytest.approx(0.01, rel=1e-4)
    assert (result.worst_rebuilt.layer, result.worst_rebuilt.kv_head, result.worst_rebuilt.tensor) == \
        (1, 0, "KV"[tensor])


def test_a_small_head_is_judged_by_its_own_scale_not_the_largest_heads():
    """Head 1 of layer 1 is 10^5 times smaller than the rest: off by half of itself, it is far below a
    bound scaled by the largest |value| of the whole cache, and still fails."""
    reference = two_devices_kv(scale_of_small_head=1e-5)
    changed = planted(reference, (1, 1, 1), 0, lambda t: t.mul_(1.5))
    whole_cache_scale = max(t.abs().max().item() for pair in reference.values() for t in pair)
    absolute_error = (changed[(1, 1, 1)][0] - reference[(1, 1, 1)][0]).abs().max().item()
    assert absolute_error < REBUILT_KV_TOLERANCE[DTYPE] * whole_cache_scale  # a global bound would pass it
    result = check_kv(changed, reference, kept=frozenset(), dtype=DTYPE, length=POSITIONS)
    assert not result.ok and result.rebuilt_max_rel_error == pytest.approx(0.5, rel=1e-5)


def test_a_head_held_nowhere_or_without_reference_fails():
    reference = two_devices_kv()
    missing = {k: v for k, v in reference.items() if k[2] != 1}
    result = check_kv(missing, reference, kept=frozenset(), dtype=DTYPE, length=POSITIONS)
    assert not result.ok and "KV head 2 of layer 0 is held by no device" in result.describe()
    stranger = {**reference, (0, 0, 5): reference[(0, 0, 0)]}
    assert "no failure-free reference" in check_kv(stranger, reference, frozenset(), DTYPE, POSITIONS).describe()


def cut(kv: dict, positions: int) -> dict:
    """Every head of `kv` cut to its first `positions` positions."""
    return {k: tuple(t[:positions] for t in pair) for k, pair in kv.items()}


@pytest.mark.parametrize("kept", [frozenset(), frozenset({(0, 0), (1, 1)})], ids=["rebuilt", "kept"])
@pytest.mark.parametrize("held, says", [
    (POSITIONS - 1, f"holds {POSITIONS - 1} positions, the context {POSITIONS}"),       # shorter
    (0, f"holds 0 positions, the context {POSITIONS}"),                                 # empty
    (POSITIONS + 1, f"holds {POSITIONS + 1} positions, the context {POSITIONS}"),       # longer
], ids=["shorter", "empty", "longer"])
def test_a_head_that_does_not_cover_exactly_the_claimed_context_fails(held, says, kept):
    """Its positions agree with the reference's wherever both have them: only the length is wrong."""
    reference = two_devices_kv()
    grown = {k: tuple(torch.cat([t, t[-1:]]) for t in pair) for k, pair in reference.items()}
    recovered = cut(grown, held)
    result = check_kv(recovered, grown, kept, DTYPE, length=POSITIONS)
    assert not result.ok
    assert f"K of KV head 1, layer 0, Device-0: {says}" in result.describe()


def test_a_reference_shorter_than_the_claimed_context_fails():
    reference = two_devices_kv()
    result = check_kv(reference, cut(reference, POSITIONS - 2), frozenset(), DTYPE, length=POSITIONS)
    assert not result.ok
    assert f"the failure-free reference holds only {POSITIONS - 2} of the {POSITIONS} positions" in result.describe()


def test_a_reference_snapshotted_later_is_compared_by_the_claimed_contexts_prefix():
    reference = two_devices_kv()
    assert check_kv(cut(reference, 4), reference, kept=frozenset({(0, 0), (1, 1)}), dtype=DTYPE, length=4).ok
    off_after_the_prefix = planted(reference, (0, 1, 0), 0, lambda t: t[4:].mul_(2.0))
    assert check_kv(cut(reference, 4), off_after_the_prefix, frozenset(), DTYPE, length=4).ok


def test_a_rebuilt_head_on_another_device_is_compared_with_the_device_that_held_it():
    reference = two_devices_kv()
    moved = {**reference, (0, 0, 1): reference[(1, 0, 1)], (0, 1, 1): reference[(1, 1, 1)]}
    assert check_kv(moved, reference, kept=frozenset({(0, 0), (1, 1)}), dtype=DTYPE, length=POSITIONS).ok


def test_logits_differences_are_relative_to_each_steps_scale():
    want = [torch.tensor([10.0, -20.0, 5.0]), torch.tensor([0.1, 0.2, -0.4])]
    assert logits_rel_diff(want, want) == 0.0
    shifted = [want[0], want[1] + torch.tensor([0.0, 0.004, 0.0])]  # 1% of the second step's scale
    assert logits_rel_diff(shifted, want) == pytest.approx(0.01, rel=1e-4)
    assert logits_rel_diff(shifted, want) > LOGITS_TOLERANCE[DTYPE]
    assert logits_rel_diff(want[:1], want) == float("inf")
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0


def test_a_near_tie_is_a_step_whose_top_two_are_within_twice_the_bound_of_the_scale():
    tolerance = 1e-2
    steps = [torch.tensor([10.0, 9.9, -3.0]),   # margin 0.1 <= 2 x 1% x 10: rounding may swap them
             torch.tensor([10.0, 9.7, -3.0]),   # margin 0.3: it may not
             torch.tensor([-8.0, 1.0, 0.95])]   # margin 0.05 <= 2 x 1% x 8 (the scale is the largest |logit|)
    assert near_ties(steps, tolerance) == {0, 2}


def test_an_output_is_judged_at_its_first_divergent_token_by_the_failure_free_margin_and_scale_there():
    want, margins, scales = [5, 6, 7], [4.0, 0.1, 0.3], [10.0, 10.0, 10.0]
    assert first_divergence(want, want, margins, scales, 1e-2) is None
    tie = first_divergence([5, 9, 9], want, margins, scales, 1e-2)  # 0.1 <= 2 x 1% x 10
    assert tie == Divergence(1, 0.1, pytest.approx(0.2)) and tie.near_tie
    assert not first_divergence([5, 6, 9], want, margins, scales, 1e-2).near_tie  # 0.3 > 0.2
    assert not first_divergence([5, 6], want, margins, scales, 1e-2).near_tie  # shorter: never a near-tie
    assert first_divergence([5, 6], want, margins, scales, 1e-2).token == 2


def test_kept_heads_are_the_survivors_own_heads_for_a_reuse_strategy_only():
    held = {0: (0, 1), 2: (4,)}
    assert kept_heads(held, reuses_kv=True) == {(0, 0), (0, 1), (2, 4)}
    assert kept_heads(held, reuses_kv=False) == frozenset()


# --------------------------------------------------------------------------------------------
# On every strategy's real recovery


class Recovered(NamedTuple):
    kv: dict                          # what the devices hold after the recovery
    reference: dict                   # the failure-free run's KV at the failure point
    kept: frozenset[tuple[int, int]]  # (device, KV head) pairs the strategy reused
    rebuilt: list[tuple[int, int]]    # the others
    length: int                       # the context the recovery claims to have rebuilt


@pytest.fixture(scope="module")
def recoveries(tiny) -> dict[str, Recovered]:
    """For each strategy, what it left after Device-1 of 4 crashes mid-step and its heads go to one
    survivor."""
    assignment = even_assignment(tiny.config, 4)
    with FaultTolerantLlama(tiny, assignment, DTYPE, heartbeat=HEARTBEAT) as reference_model:
        reference = failure_free_run(reference_model, PROMPT, 4, FAIL_AFTER).kv
    found = {}
    for name in STRATEGIES:
        with FaultTolerantLlama(tiny, assignment, DTYPE, heartbeat=HEARTBEAT,
                                policy=RecoveryPolicy("random", 0, name, hold=True)) as model:
            model.keep(True, True)
            tokens = [int(model.prefill(PROMPT).argmax())]
            tokens.append(int(model.decode(tokens[-1]).argmax()))
            model.arm(FailurePlan(1, FAIL_AFTER))
            with pytest.raises(StepFailed):
                model.decode(tokens[-1])
            held = {d: assignment.kv_heads(d) for d in assignment.devices if d != 1}
            result = model.recover(name)
            assert result.strategy == name and result.fallback_reason is None
            recovered = model.kv_snapshot()
        kept = kept_heads(held, STRATEGIES[name].reuses_kv)
        rebuilt = sorted({(d, g) for d, _, g in recovered} - kept)
        found[name] = Recovered(recovered, reference, kept, rebuilt, result.context_tokens)
    return found


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_passes_untouched_and_fails_with_one_percent_in_one_rebuilt_position(recoveries, strategy):
    recovered, reference, kept, rebuilt, length = recoveries[strategy]
    assert rebuilt, "the failure left no head to rebuild"
    assert length == len(PROMPT) + FAIL_AFTER - 1
    assert check_kv(recovered, reference, kept, DTYPE, length).ok
    device, g = rebuilt[-1]
    layer = 1
    for tensor in (0, 1):
        wrong = planted(recovered, (device, layer, g), tensor, one_percent_at_the_largest_entry)
        result = check_kv(wrong, reference, kept, DTYPE, length)
        assert not result.ok, f"{strategy}: a 1% error in {'KV'[tensor]} went unnoticed"
        assert (result.worst_rebuilt.device, result.worst_rebuilt.layer, result.worst_rebuilt.kv_head) == \
            (device, layer, g)


@pytest.mark.parametrize("strategy", ["reuse-replay", "reuse-hidden", "replicate"])
def test_every_reuse_strategy_fails_with_one_ulp_in_a_kept_head(recoveries, strategy):
    recovered, reference, kept, _, length = recoveries[strategy]
    device, g = sorted(kept)[0]
    wrong = planted(recovered, (device, 0, g), 0, one_ulp)
    result = check_kv(wrong, reference, kept, DTYPE, length)
    assert not result.ok and result.kept_max_abs_diff > 0


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_fails_when_one_head_lacks_the_last_position_of_the_context(recoveries, strategy):
    """The prefix held is right to the bit: only the position it lacks can tell."""
    recovered, reference, kept, rebuilt, length = recoveries[strategy]
    for device, g in (rebuilt[-1], *sorted(kept)[:1]):
        short = {**recovered, (device, 2, g): tuple(t[:length - 1] for t in recovered[(device, 2, g)])}
        result = check_kv(short, reference, kept, DTYPE, length)
        assert not result.ok
        assert f"layer 2, Device-{device}: holds {length - 1} positions, the context {length}" in result.describe()
