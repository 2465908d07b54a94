"""Many requests in flight on the engine: `generate_batch` gives every prompt the tokens the
reference gives it alone (greedy, fp32, the tiny preset), whatever the budgets make of the batch
(prefill chunked by the token budget, requests preempted and recomputed when the KV pool runs
out, newcomers joining running ones), on every backend; and a device that crashes with several
requests in flight (some decoding, one prefilling, some finished, some still waiting) loses none of
them: every request's tokens equal the failure-free run's."""
from __future__ import annotations

import pytest
import torch

from device_protocol import RecoveryPolicy
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama
from head_assignment import even_assignment
from heartbeat_detection import HeartbeatConfig
from request_scheduler import SchedulerConfig
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
