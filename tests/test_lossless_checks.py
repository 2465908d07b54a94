"""Specifications for lossless_checks.py: the checks must fail for a recovery that is even slightly wrong.

Unit cases on hand-made KV, then every strategy's real recovery on the tiny preset with one error
planted: a 1% error in one position of one layer of one rebuilt head, and one ulp in a kept head.
"""
from __future__ import annotations

import pytest
import torch

from cluster_leader import StepFailed
from device_protocol import RecoveryPolicy
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama
from head_assignment import even_assignment
from heartbeat_detection import HeartbeatConfig
from kv_cache_reused import STRATEGIES
from lossless_checks import (LOGITS_TOLERANCE, REBUILT_KV_TOLERANCE, check_kv, kept_heads, logits_rel_diff,
                             near_ties, relative_error)
from performance_comparator import failure_free_run

DTYPE = torch.float32
HEARTBEAT = HeartbeatConfig(interval_s=0.05, timeout_s=0.5)  # short, with room for a loaded 2-core machine
PROMPT = [256] + [(41 * i + 7) % 250 for i in range(19)]
FAIL_AFTER = 2


def two_devices_kv(scale_of_small_head: float = 1.0) -> dict:
    """Device-0 holds KV head 0 and Device-1 KV head 1, 2 layers, 6 positions; head 1 of layer 1 scaled."""
    generator = torch.Generator().manual_seed(0)
    kv = {}
    for device, g in ((0, 0), (1, 1)):
        for layer in range(2):
            scale = scale_of_small_head if (g, layer) == (1, 1) else 1.0
            kv[(device, layer, g)] = tuple(torch.randn(6, 4, generator=generator) * scale for _ in "KV")
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
    result = check_kv(reference, reference, kept=frozenset({(0, 0), (1, 1)}), dtype=DTYPE)
    assert result.ok and result.kept_max_abs_diff == 0.0 and result.rebuilt_max_rel_error == 0.0
    assert result.describe() == "lossless"


def test_one_ulp_in_a_kept_head_fails_and_names_the_head():
    reference = two_devices_kv()
    changed = planted(reference, (1, 1, 1), 1, one_ulp)
    result = check_kv(changed, reference, kept=frozenset({(0, 0), (1, 1)}), dtype=DTYPE)
    assert not result.ok and result.kept_max_abs_diff > 0
    assert (result.worst_kept.device, result.worst_kept.layer, result.worst_kept.kv_head,
            result.worst_kept.tensor) == (1, 1, 1, "V")
    assert "kept KV changed: V of KV head 2, layer 1, Device-1" in result.describe()
    # the same ulp in a head that was rebuilt is rounding, within the bound
    assert check_kv(changed, reference, kept=frozenset({(0, 0)}), dtype=DTYPE).ok


@pytest.mark.parametrize("tensor", [0, 1], ids=["K", "V"])
def test_one_percent_in_one_position_of_a_rebuilt_head_fails(tensor):
    reference = two_devices_kv()
    changed = planted(reference, (0, 1, 0), tensor, one_percent_at_the_largest_entry)
    result = check_kv(changed, reference, kept=frozenset(), dtype=DTYPE)
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
    result = check_kv(changed, reference, kept=frozenset(), dtype=DTYPE)
    assert not result.ok and result.rebuilt_max_rel_error == pytest.approx(0.5, rel=1e-5)


def test_a_head_held_nowhere_or_shorter_than_the_context_or_without_reference_fails():
    reference = two_devices_kv()
    missing = {k: v for k, v in reference.items() if k[2] != 1}
    result = check_kv(missing, reference, kept=frozenset(), dtype=DTYPE)
    assert not result.ok and "KV head 2 of layer 0 is held by no device" in result.describe()
    longer = {k: tuple(torch.cat([t, t[:1]]) for t in pair) for k, pair in reference.items()}
    assert not check_kv(longer, reference, kept=frozenset(), dtype=DTYPE).ok
    stranger = {**reference, (0, 0, 5): reference[(0, 0, 0)]}
    assert "no failure-free reference" in check_kv(stranger, reference, frozenset(), DTYPE).describe()


def test_a_reference_snapshotted_later_is_compared_by_its_prefix():
    reference = two_devices_kv()
    prefix = {k: tuple(t[:4] for t in pair) for k, pair in reference.items()}
    assert check_kv(prefix, reference, kept=frozenset({(0, 0), (1, 1)}), dtype=DTYPE).ok


def test_a_rebuilt_head_on_another_device_is_compared_with_the_device_that_held_it():
    reference = two_devices_kv()
    moved = {**reference, (0, 0, 1): reference[(1, 0, 1)], (0, 1, 1): reference[(1, 1, 1)]}
    assert check_kv(moved, reference, kept=frozenset({(0, 0), (1, 1)}), dtype=DTYPE).ok


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


def test_kept_heads_are_the_survivors_own_heads_for_a_reuse_strategy_only():
    held = {0: (0, 1), 2: (4,)}
    assert kept_heads(held, reuses_kv=True) == {(0, 0), (0, 1), (2, 4)}
    assert kept_heads(held, reuses_kv=False) == frozenset()


# --------------------------------------------------------------------------------------------
# On every strategy's real recovery


@pytest.fixture(scope="module")
def recoveries(tiny):
    """For each strategy: (recovered KV, failure-free KV, kept pairs, rebuilt pairs) after Device-1 of 4
    crashes mid-step and its heads go to one survivor."""
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
        found[name] = (recovered, reference, kept, rebuilt)
    return found


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_passes_untouched_and_fails_with_one_percent_in_one_rebuilt_position(recoveries, strategy):
    recovered, reference, kept, rebuilt = recoveries[strategy]
    assert rebuilt, "the failure left no head to rebuild"
    assert check_kv(recovered, reference, kept, DTYPE).ok
    device, g = rebuilt[-1]
    layer = 1
    for tensor in (0, 1):
        wrong = planted(recovered, (device, layer, g), tensor, one_percent_at_the_largest_entry)
        result = check_kv(wrong, reference, kept, DTYPE)
        assert not result.ok, f"{strategy}: a 1% error in {'KV'[tensor]} went unnoticed"
        assert (result.worst_rebuilt.device, result.worst_rebuilt.layer, result.worst_rebuilt.kv_head) == \
            (device, layer, g)


@pytest.mark.parametrize("strategy", ["reuse-replay", "reuse-hidden", "replicate"])
def test_every_reuse_strategy_fails_with_one_ulp_in_a_kept_head(recoveries, strategy):
    recovered, reference, kept, _ = recoveries[strategy]
    device, g = sorted(kept)[0]
    wrong = planted(recovered, (device, 0, g), 0, one_ulp)
    result = check_kv(wrong, reference, kept, DTYPE)
    assert not result.ok and result.kept_max_abs_diff > 0
