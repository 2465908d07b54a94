"""The scheduler on its own: admission, the token budget, chunked prefill, retirement, preemption
(RECOMPUTE), cancelling, resizing the pool after a failure, and random workloads against a stand-in
model whose next token depends on every token before it (so a preempted request that was not
recomputed exactly would produce other tokens)."""
from __future__ import annotations

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from request_scheduler import Scheduler, ScheduledStep, Status


def next_token(tokens) -> int:
    """A stand-in model: greedy, deterministic, and sensitive to every earlier token and position."""
    return (sum((i + 1) * t for i, t in enumerate(tokens)) * 31 + len(tokens)) % 97


def alone(prompt, max_new: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_new):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def check_step(scheduler: Scheduler, step: ScheduledStep) -> None:
    """What every step must be: within its budgets, each chunk continuing its sequence, in blocks of its own."""
    assert step.num_tokens <= scheduler.max_num_batched_tokens
    assert len(scheduler.running) <= scheduler.max_num_seqs
    held = [b for table in scheduler.pool.tables.values() for b in table]
    assert len(held) == len(set(held)) and all(0 <= b < scheduler.pool.num_blocks for b in held)
    for chunk in step.chunks:
        request = scheduler.requests[chunk.request_id]
        assert chunk.start == request.num_computed
        assert chunk.token_ids == request.token_ids[chunk.start:chunk.start + len(chunk.token_ids)]
        assert len(chunk.block_table) * scheduler.pool.block_size >= chunk.start + len(chunk.token_ids)
        assert chunk.samples == (chunk.start + len(chunk.token_ids) == request.num_tokens)


def run(scheduler: Scheduler, arrivals=(), max_steps: int = 10_000) -> list[ScheduledStep]:
    """Drive the scheduler with the stand-in model, adding each (step, id, prompt, max_new) at its step."""
    pending, steps = sorted(arrivals), []
    while pending or scheduler.has_work:
        assert len(steps) < max_steps, "the workload never finished"
        while pending and pending[0][0] <= len(steps):
            _, request_id, prompt, max_new = pending.pop(0)
            scheduler.add(request_id, prompt, max_new)
        step = scheduler.schedule()
        assert step.chunks or not scheduler.has_work, "work is waiting but nothing was scheduled"
        check_step(scheduler, step)
        sampled = {c.request_id: next_token(scheduler.requests[c.request_id].token_ids)
                   for c in step.chunks if c.samples}
        scheduler.finish_step(step, sampled)
        steps.append(step)
    return steps


def three_after_their_prefill(num_blocks: int) -> Scheduler:
    """Three requests of four prompt tokens, in blocks of two positions, each past its prefill step."""
    scheduler = Scheduler(num_blocks=num_blocks, block_size=2)
    for i in range(3):
        scheduler.add(i, [i + 1] * 4, max_new_tokens=3)
    first = scheduler.schedule()
    scheduler.finish_step(first, {c.request_id: next_token(c.token_ids) for c in first.chunks})
    return scheduler


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget_and_samples_only_at_its_end():
    scheduler = Scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=5)
    scheduler.add(0, list(range(1, 13)), max_new_tokens=2)
    steps = run(scheduler)
    assert [(c.start, len(c.token_ids), c.samples) for s in steps for c in s.chunks] == [
        (0, 5, False), (5, 5, False), (10, 2, True), (12, 1, True)]
    assert scheduler.requests[0].output_ids == alone(range(1, 13), 2)


def test_running_requests_decode_together_and_waiting_ones_join_within_the_budgets():
    scheduler = Scheduler(num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=8)
    for i in range(3):
        scheduler.add(i, [i + 1] * 3, max_new_tokens=4)
    first = scheduler.schedule()
    assert [c.request_id for c in first.chunks] == [0, 1]  # max_num_seqs holds the third back
    scheduler.finish_step(first, {0: 5, 1: 6})
    second = scheduler.schedule()
    assert [(c.request_id, len(c.token_ids)) for c in second.chunks] == [(0, 1), (1, 1)]


def test_a_finished_request_frees_its_blocks_and_the_next_is_admitted():
    scheduler = Scheduler(num_blocks=2, block_size=4, max_num_seqs=4)
    scheduler.add(0, [1, 2, 3, 4], max_new_tokens=2)
    scheduler.add(1, [5, 6, 7, 8], max_new_tokens=1)
    steps = run(scheduler)
    assert {r.status for r in scheduler.requests.values()} == {Status.FINISHED}
    assert scheduler.pool.free_blocks == 2
    assert [c.request_id for c in steps[0].chunks] == [0, 1]


def test_the_end_of_sequence_token_stops_a_request_early():
    scheduler = Scheduler(num_blocks=8, block_size=4)
    prompt = [3, 1, 4]
    eos = alone(prompt, 3)[1]
    scheduler.add(0, prompt, max_new_tokens=10, eos_token_ids=(eos,))
    run(scheduler)
    assert scheduler.requests[0].status is Status.STOPPED
    assert scheduler.requests[0].output_ids == alone(prompt, 2)


def test_when_blocks_run_out_the_newest_request_is_preempted_and_recomputed_to_the_same_tokens():
    scheduler = Scheduler(num_blocks=4, block_size=2, max_num_seqs=4)
    prompts = {0: [1, 2, 3], 1: [4, 5, 6]}
    for request_id, prompt in prompts.items():
        scheduler.add(request_id, prompt, max_new_tokens=4)
    steps = run(scheduler)
    assert scheduler.preemptions >= 1 and scheduler.requests[1].preemptions >= 1
    assert scheduler.requests[0].preemptions == 0  # the oldest is never the one preempted for another
    assert any(1 in s.preempted for s in steps)
    for request_id, prompt in prompts.items():
        assert scheduler.requests[request_id].output_ids == alone(prompt, 4)


def test_a_cancelled_request_leaves_the_queue_or_the_batch_and_frees_its_blocks():
    scheduler = Scheduler(num_blocks=8, block_size=4, max_num_seqs=1)
    scheduler.add(0, [1, 2], max_new_tokens=5)
    scheduler.add(1, [3, 4], max_new_tokens=5)
    step = scheduler.schedule()
    assert scheduler.cancel(1)  # waiting
    assert scheduler.cancel(0)  # running, its step in flight: the step's result is ignored
    assert scheduler.finish_step(step, {0: 7}) == []
    assert scheduler.requests[0].output_ids == [] and not scheduler.has_work
    assert scheduler.pool.free_blocks == 8
    assert not scheduler.cancel(0)


def test_a_request_that_could_never_fit_the_pool_is_refused_when_added():
    scheduler = Scheduler(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="needs 3 KV blocks at its longest; the pool has 2"):
        scheduler.add(0, [1] * 8, max_new_tokens=2)
    with pytest.raises(ValueError, match="exists already"):
        scheduler.add(1, [1], 1)
        scheduler.add(1, [1], 1)


def test_after_a_failure_running_requests_get_fresh_blocks_for_what_they_had_and_the_newest_wait_if_too_few():
    scheduler = three_after_their_prefill(num_blocks=9)
    assert scheduler.restart_pool(5) == [2]  # 2 blocks each for 4 computed positions: only two fit
    assert scheduler.requests[2].status is Status.WAITING and scheduler.requests[2].num_computed == 0
    (recompute,) = scheduler.recompute_steps()
    assert [(c.request_id, c.start, c.token_ids, c.samples) for c in recompute.chunks] == [
        (0, 0, (1, 1, 1, 1), False), (1, 0, (2, 2, 2, 2), False)]
    run(scheduler)
    for i in range(3):
        assert scheduler.requests[i].output_ids == alone([i + 1] * 4, 3)


def test_the_recompute_after_a_failure_keeps_to_the_token_budget():
    scheduler = Scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=5)
    scheduler.add(0, list(range(1, 8)), max_new_tokens=2)
    scheduler.add(1, [9, 9, 9], max_new_tokens=2)
    while scheduler.requests[0].num_computed < 7 or scheduler.requests[1].num_computed < 3:
        step = scheduler.schedule()
        scheduler.finish_step(step, {c.request_id: next_token(c.token_ids) for c in step.chunks if c.samples})
    scheduler.restart_pool(16)
    steps = scheduler.recompute_steps()
    assert [[(c.request_id, c.start, len(c.token_ids)) for c in s.chunks] for s in steps] == [
        [(0, 0, 5)], [(0, 5, 2), (1, 0, 3)]]
    assert all(s.num_tokens <= 5 for s in steps)


def test_a_pool_that_shrinks_after_a_failure_keeps_every_block_that_fits_and_renumbers_the_rest():
    scheduler = three_after_their_prefill(num_blocks=8)
    before = {i: list(scheduler.pool.tables[i]) for i in range(3)}
    assert before == {0: [0, 1], 1: [2, 3], 2: [4, 5]}
    scheduler.cancel(1)  # frees blocks 2 and 3, so that block 4 and 5 can move below the new end
    preempted, moves = scheduler.resize(4)
    assert preempted == [] and moves == {4: 2, 5: 3}
    assert scheduler.pool.tables == {0: [0, 1], 2: [2, 3]} and scheduler.pool.free_blocks == 0
    assert [r.num_computed for r in scheduler.in_flight()] == [4, 4]  # kept: nothing to recompute
    run(scheduler)
    assert scheduler.requests[2].output_ids == alone([3] * 4, 3)


def test_a_pool_too_small_for_every_running_request_after_a_failure_preempts_the_newest_not_losing_it():
    scheduler = three_after_their_prefill(num_blocks=9)
    preempted, moves = scheduler.resize(5)
    assert preempted == [2] and moves == {}
    assert scheduler.requests[2].status is Status.WAITING and scheduler.requests[2].num_computed == 0
    assert scheduler.pool.num_blocks == 5 and scheduler.pool.free_blocks == 1
    run(scheduler)
    for i in range(3):
        assert scheduler.requests[i].output_ids == alone([i + 1] * 4, 3)


def test_a_pool_that_grows_after_a_failure_keeps_every_block_and_frees_the_new_ones():
    scheduler = Scheduler(num_blocks=4, block_size=2)
    scheduler.add(0, [1] * 4, max_new_tokens=2)
    scheduler.finish_step(scheduler.schedule(), {0: 5})
    assert scheduler.resize(6) == ([], {})
    assert scheduler.pool.tables == {0: [0, 1]} and scheduler.pool.free_blocks == 4


workload = st.lists(st.tuples(st.integers(0, 12), st.lists(st.integers(0, 96), min_size=1, max_size=20),
                              st.integers(1, 12)), min_size=1, max_size=10)


@settings(max_examples=150, deadline=None)
@given(workload, st.integers(1, 4), st.integers(1, 8), st.integers(1, 6), st.integers(1, 40))
def test_any_workload_finishes_every_request_with_the_tokens_it_gives_alone(arrivals, block_size, extra_blocks,
                                                                            max_num_seqs, budget):
    longest = max(len(prompt) + max_new for _, prompt, max_new in arrivals)
    scheduler = Scheduler(num_blocks=-(-longest // block_size) + extra_blocks, block_size=block_size,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    run(scheduler, [(at, i, prompt, max_new) for i, (at, prompt, max_new) in enumerate(arrivals)])
    for i, (_, prompt, max_new) in enumerate(arrivals):
        assert scheduler.requests[i].status is Status.FINISHED
        assert scheduler.requests[i].output_ids == alone(prompt, max_new)
    assert scheduler.pool.free_blocks == scheduler.pool.num_blocks


def test_a_copy_of_the_scheduler_carries_only_the_tables_and_finds_its_free_blocks_when_used():
    """The leader's record travels to its successor every step: a copy holds the block tables only
    (not a thousand free block numbers), shares nothing with the original, and serves on exactly as
    the original would."""
    scheduler = three_after_their_prefill(num_blocks=1000)
    assert len(pickle.dumps(scheduler)) < 2000
    outputs = [list(r.output_ids) for r in scheduler.requests.values()]
    successor = scheduler.copy()
    assert successor.pool.free_blocks == scheduler.pool.free_blocks == 994
    run(successor)
    assert [r.output_ids for r in scheduler.requests.values()] == outputs and scheduler.pool.free_blocks == 994
    assert [r.output_ids for r in successor.requests.values()] == [alone([i + 1] * 4, 3) for i in range(3)]
    assert successor.pool.free_blocks == 1000
