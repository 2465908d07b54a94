"""Many requests in flight on the engine: `generate_batch` gives every prompt the tokens the
reference gives it alone (greedy, fp32, the tiny preset), whatever the budgets make of the batch
(prefill chunked by the token budget, requests preempted and recomputed when the KV pool runs
out, newcomers joining running ones), on every backend; and a device that crashes with several
requests in flight (some decoding, one prefilling, some finished, some still waiting) loses none of
them: every request's tokens equal the failure-free run's, with every strategy. The reuse
strategies keep the survivors' blocks: the same bits as the failure-free run's, the rebuilt heads
within the project's bound."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pytest
import torch

from batched_forward import PagedHiddenStates
from device_protocol import RecoveryPolicy, ServedStep
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama
from head_assignment import even_assignment
from heartbeat_detection import HeartbeatConfig
from lossless_checks import check_kv
from request_scheduler import BlockCosts, SchedulerConfig, pool_blocks
from tensor_parallel_cluster import TensorParallelLlama

HEARTBEAT = HeartbeatConfig(interval_s=0.05, timeout_s=1.0)
PROMPT_LENGTHS, NEW_TOKENS = (21, 5, 13, 34, 8, 3), (6, 9, 4, 5, 7, 8)


def prompts(seed: int = 11) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [[256] + torch.randint(0, 256, (n - 1,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def budget_for_blocks(model_config, blocks: int, block_size: int, kv_heads_per_device: int = 1) -> int:
    """The per-device KV budget that makes a pool of `blocks` blocks (fp32, the given heads each)."""
    return blocks * 2 * model_config.num_hidden_layers * kv_heads_per_device * block_size * model_config.head_dim * 4


def reference_tokens(hf, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def references(tiny_checkpoint, hf_reference) -> list[list[int]]:
    hf = hf_reference(tiny_checkpoint)
    return [reference_tokens(hf, p, n) for p, n in zip(prompts(), NEW_TOKENS)]


def tight_budget(tiny) -> SchedulerConfig:
    """20 blocks of 4 positions per device holding one KV head (10 for one that holds both after a
    failure): too few for every request at once, so some are preempted, enough for the longest alone."""
    return SchedulerConfig(budget_for_blocks(tiny.config, 20, 4), 4, max_num_seqs=4, max_num_batched_tokens=24)


def test_generate_batch_gives_every_prompt_the_references_tokens_with_preemption_and_chunking(
        tiny, backend, references):
    preempted = []
    with TensorParallelLlama(tiny, even_assignment(tiny.config, 4), heartbeat=HEARTBEAT, backend=backend,
                             scheduling=tight_budget(tiny)) as model:
        outputs = model.generate_batch(prompts(), NEW_TOKENS, after_step=lambda s: preempted.extend(s.preempted))
    assert outputs == references
    assert preempted, "the pool was sized so that some request is preempted and recomputed"


@pytest.mark.parametrize("device", [0, 1, 3])
def test_a_crash_with_requests_in_flight_loses_none_of_them_the_leaders_included(tiny, backend, references, device):
    steps = []

    def strike_at_the_fourth_step(served) -> None:
        steps.append(served)
        if len(steps) == 4:
            assert served.running >= 2 and served.waiting >= 1, "the failure must find requests in flight and waiting"
            model.arm(FailurePlan(device))

    with FaultTolerantLlama(tiny, even_assignment(tiny.config, 4), heartbeat=HEARTBEAT, backend=backend,
                            scheduling=tight_budget(tiny),
                            policy=RecoveryPolicy(strategy="full-recompute")) as model:
        outputs = model.generate_batch(prompts(), NEW_TOKENS, after_step=strike_at_the_fourth_step)
        (recovery,) = model.recoveries
    assert outputs == references
    assert [e.device for e in recovery.events] == [device]
    assert recovery.strategy == "full-recompute" and recovery.context_tokens > 0
    assert steps[-1].leader == (1 if device == 0 else 0)  # the lowest survivor took over the leader's requests


def test_a_cancelled_request_ends_and_the_others_go_on(tiny, references):
    with TensorParallelLlama(tiny, even_assignment(tiny.config, 2), heartbeat=HEARTBEAT) as model:
        first, second = (model.submit(p, n) for p, n in zip(prompts()[:2], NEW_TOKENS[:2]))
        tokens = {first: [], second: []}
        served = model.step()
        assert model.cancel(second) and not model.cancel(second)
        for request_id, token in served.tokens.items():
            tokens[request_id].append(token)
        while first not in served.ended:
            served = model.step()
            assert second not in served.tokens
            tokens[first] += [served.tokens[first]]
    assert tokens[first] == references[0]


def test_abort_fails_the_running_requests_at_a_failure_and_serves_the_others_on_the_survivors(tiny, references):
    """The baseline of serving engines today: no rebuild; what ran ends "aborted", the rest are served."""
    ended: dict[int, str] = {}
    open_at_failure: set[int] = set()

    def strike_at_the_fourth_step(served: ServedStep) -> None:
        ended.update(served.ended)
        if served.step == 4:
            open_at_failure.update(set(range(1, len(PROMPT_LENGTHS) + 1)) - set(ended))
            model.arm(FailurePlan(1))

    with FaultTolerantLlama(tiny, even_assignment(tiny.config, 4), heartbeat=HEARTBEAT, scheduling=tight_budget(tiny),
                            policy=RecoveryPolicy(strategy="abort")) as model:
        outputs = model.generate_batch(prompts(), NEW_TOKENS, after_step=strike_at_the_fourth_step)
        (recovery,) = model.recoveries
    aborted = {r for r, why in ended.items() if why == "aborted"}
    assert recovery.strategy == "abort" and recovery.context_tokens == 0
    assert aborted and aborted < open_at_failure, "the running requests are aborted, the waiting ones are not"
    for request_id, (output, reference) in enumerate(zip(outputs, references), start=1):
        assert output == (reference[:len(output)] if request_id in aborted else reference)
        assert (len(output) < len(reference)) == (request_id in aborted)


# --------------------------------------------------------------------------------------------
# The reuse strategies over a batch

KEEPING = {"full-recompute": (False, False), "reuse-replay": (False, False), "reuse-hidden": (True, False),
           "replicate": (False, True)}  # (hidden states, replication) each strategy needs kept
STRIKE_STEP = 6  # after it, two requests decode, one is in its prefill, one has finished and two wait


def in_flight_budget(tiny, strategy: str, blocks: int = 40, max_num_batched_tokens: int = 20) -> SchedulerConfig:
    """`blocks` blocks of 4 positions per device whatever the strategy keeps (the same schedule for
    every strategy): what is kept costs the budget its bytes."""
    hidden, replication = KEEPING[strategy]
    per_block = budget_for_blocks(tiny.config, 1, 4, 2 if replication else 1) + (
        PagedHiddenStates.block_nbytes(tiny.config.num_hidden_layers, tiny.config.hidden_size, 4, torch.float32)
        if hidden else 0)
    return SchedulerConfig(blocks * per_block, 4, max_num_seqs=3, max_num_batched_tokens=max_num_batched_tokens)


@dataclass
class Served:
    outputs: list[list[int]]
    steps: list[ServedStep]
    recoveries: list
    kv: dict  # request -> (device, layer, KV head) -> (K, V): after the strike step, or after the recovery


def serve(tiny, strategy: str, crash: int | None = None, devices: int = 4, backend: str = "threads",
          scheduling: SchedulerConfig | None = None, strike_step: int = STRIKE_STEP,
          keeping: tuple[bool, bool] | None = None, failures: Sequence[FailurePlan] = ()) -> Served:
    """The prompts served with what `strategy` keeps; device `crash` (or the `failures` planned)
    fails after `strike_step` steps. The running requests' KV is taken after that step
    (failure-free) or after the next, which recovered."""
    steps, kv = [], {}
    plans = list(failures) or ([FailurePlan(crash)] if crash is not None else [])

    def after_step(served: ServedStep) -> None:
        steps.append(served)
        if len(steps) == strike_step:
            for plan in plans:
                model.arm(plan)
        if len(steps) == strike_step + bool(plans):
            kv.update(model.batch_kv_snapshot())

    with FaultTolerantLlama(tiny, even_assignment(tiny.config, devices), heartbeat=HEARTBEAT, backend=backend,
                            scheduling=scheduling or in_flight_budget(tiny, strategy),
                            policy=RecoveryPolicy(strategy=strategy)) as model:
        model.keep(*(keeping or KEEPING[strategy]))
        outputs = model.generate_batch(prompts(), NEW_TOKENS, after_step=after_step)
        return Served(outputs, steps, list(model.recoveries), kv)


def assert_kept_blocks_bit_identical_and_rebuilt_within_bounds(model_config, free: Served, failed: Served,
                                                               devices: int) -> None:
    """Every request running before and after the recovery (not preempted by it): its positions
    computed before the failure, held by the survivors for every KV head, the kept ones the same bits."""
    (recovery,) = failed.recoveries
    before, after = even_assignment(model_config, devices), recovery.plans[-1].after
    kept = {(d, g) for d in after.devices for g in before.kv_heads(d)}
    checked, rebuilt = 0, set()
    for request_id, reference in free.kv.items():
        if request_id not in failed.kv or request_id in failed.steps[STRIKE_STEP].preempted:
            continue
        length = next(iter(reference.values()))[0].shape[0]
        recovered = {key: (k[:length], v[:length]) for key, (k, v) in failed.kv[request_id].items()}
        check = check_kv(recovered, reference, kept, torch.float32, length)
        assert check.ok, f"request {request_id}: {check.describe()}"
        checked += 1
        rebuilt |= {(d, g) for d, _, g in recovered if (d, g) not in kept}
    assert checked >= 2 and rebuilt, "some requests in flight, and some KV heads new to a survivor, were checked"


@pytest.fixture(scope="module")
def failure_free(tiny):
    """The failure-free runs, one per strategy's keeping and device count (built when first asked)."""
    runs: dict[tuple[str, int], Served] = {}

    def get(strategy: str, devices: int = 4) -> Served:
        if (strategy, devices) not in runs:
            runs[(strategy, devices)] = serve(tiny, strategy, devices=devices)
        return runs[(strategy, devices)]
    return get


def test_requests_in_flight_at_the_strike_step_are_decoding_prefilling_finished_and_waiting(failure_free):
    served = failure_free("reuse-replay").steps[STRIKE_STEP - 1]
    finished = sum(1 for s in failure_free("reuse-replay").steps[:STRIKE_STEP] for _ in s.ended)
    assert served.running == 3 and served.waiting == 2 and finished == 1
    assert len(served.tokens) == 2, "two of the three running requests decode; the third is in its prefill"


@pytest.mark.parametrize("strategy, devices", [("reuse-replay", 4), ("reuse-hidden", 4), ("replicate", 4),
                                               ("replicate", 2)])
def test_each_reuse_strategy_rebuilds_every_running_request_keeping_the_survivors_blocks(
        tiny, references, failure_free, strategy, devices):
    """4 devices: Device-1's KV head survives on Device-0, which sends it (replicate); 2 devices: only
    Device-0's replica holds Device-1's KV head, and Device-0 promotes it."""
    free = failure_free(strategy, devices)
    failed = serve(tiny, strategy, crash=1, devices=devices)
    (recovery,) = failed.recoveries
    assert (recovery.strategy, recovery.fallback_reason) == (strategy, None)
    assert recovery.context_tokens > 0
    assert failed.outputs == free.outputs == references
    assert_kept_blocks_bit_identical_and_rebuilt_within_bounds(tiny.config, free, failed, devices)


def test_a_leader_crash_with_requests_in_flight_is_rebuilt_from_the_hidden_states(tiny, references):
    failed = serve(tiny, "reuse-hidden", crash=0)
    (recovery,) = failed.recoveries
    assert (recovery.strategy, recovery.fallback_reason) == ("reuse-hidden", None)
    assert failed.outputs == references
    assert failed.steps[-1].leader == 1


def test_two_devices_lost_together_are_rebuilt_from_the_replica_that_survived(tiny, references):
    """Devices 2 and 3 held KV head 2 (and each other's copy); Device-0's copy of Device-3's survives."""
    failed = serve(tiny, "replicate", failures=[FailurePlan(2), FailurePlan(3)])
    assert failed.outputs == references
    assert sorted(e.device for r in failed.recoveries for e in r.events) == [2, 3]
    assert [(r.strategy, r.fallback_reason) for r in failed.recoveries] == [("replicate", None)] * len(failed.recoveries)


def test_a_device_lost_while_the_batch_is_recovered_is_recovered_with_it_from_the_hidden_states(tiny, references):
    failed = serve(tiny, "reuse-hidden", failures=[FailurePlan(1), FailurePlan(2, during_recovery=True)])
    (recovery,) = failed.recoveries
    assert failed.outputs == references
    assert [e.device for e in recovery.events] == [1, 2] and recovery.attempts == 2
    assert (recovery.strategy, recovery.fallback_reason) == ("reuse-hidden", None)


def test_reuse_hidden_without_hidden_states_kept_falls_back_to_full_recompute_saying_why(tiny, references):
    failed = serve(tiny, "reuse-hidden", crash=1, keeping=(False, False))
    (recovery,) = failed.recoveries
    assert recovery.strategy == "full-recompute"
    assert recovery.fallback_reason == ("reuse-hidden impossible (no hidden states were kept in the pool); "
                                        "fell back to full-recompute")
    assert failed.outputs == references


def test_a_pool_that_shrinks_after_the_failure_preempts_the_newest_which_is_not_lost(tiny, references):
    """20 blocks per device; after Device-1's crash Device-2 holds both KV heads, its pool 10 blocks.
    The three running requests hold 12 (no step of the failure-free run preempts): the kept blocks
    of the two oldest fit, the newest (the third submitted) waits and is prefilled again."""
    failed = serve(tiny, "reuse-replay", crash=1, scheduling=in_flight_budget(tiny, "reuse-replay", 20, 24),
                   strike_step=3)
    (recovery,) = failed.recoveries
    assert (recovery.strategy, recovery.fallback_reason) == ("reuse-replay", None)
    assert [s.preempted for s in failed.steps[:4]] == [(), (), (), (3,)]
    assert failed.outputs == references


def test_the_processes_backend_rebuilds_a_batch_from_the_replica(tiny, references):
    failed = serve(tiny, "replicate", crash=1, backend="processes")
    assert [(r.strategy, r.fallback_reason) for r in failed.recoveries] == [("replicate", None)]
    assert failed.outputs == references


def test_keeping_state_for_recovery_costs_blocks_of_the_same_budget(tiny):
    assignment, costs = even_assignment(tiny.config, 4), BlockCosts(kv_head=100, hidden=300)
    assert pool_blocks(assignment, costs, 12_000, False, False) == 120
    assert pool_blocks(assignment, costs, 12_000, False, True) == 60     # a copy of the predecessor's KV head
    assert pool_blocks(assignment, costs, 12_000, True, False) == 30     # every layer's input
    assert pool_blocks(assignment, costs, 12_000, True, True) == 24
