"""The cost of insurance at load: what keeping state for recovery costs a serving engine in normal
running, and at what failure rate it pays for itself.

For each batch size and each thing kept (nothing, the layers' inputs for reuse-hidden, the ring
predecessor's KV for replicate): the decode step's time with every request of the batch decoding,
and its output throughput; the requests of the workload's mean length that one KV budget holds
(what is kept is paged with the KV and costs blocks of the same budget: cluster_leader.pool_blocks).
A strategy's insurance pays once failures are frequent enough that the time it saves per failure
(its whole interruption against full recompute's, from the serving runs) outweighs the throughput
it gives up: break-even = 3600 x (1 - its throughput / nothing kept's) / seconds saved, per hour.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Sequence

KEPT = {"nothing kept": (False, False), "hidden states": (True, False), "replica": (False, True)}
STRATEGY_KEEPS = {"full-recompute": "nothing kept", "reuse-replay": "nothing kept", "reuse-hidden": "hidden states",
                  "replicate": "replica"}  # what each strategy needs kept (hidden states, KV replication)


def decode_step_s(model: Any, prompts: Sequence[Sequence[int]], batch: int, steps: int,
                  step_budget: int) -> float | None:
    """The median decode step with `batch` requests decoding (the workload's prompts cycled; their
    prefill untimed), the requests cancelled after. Each asks for enough tokens that none ends before
    the timed steps do, however many steps the prefill takes under the `step_budget` of tokens.
    None when the KV budget, with what is kept, cannot hold the batch (the scheduler preempted one)."""
    chosen = [prompts[i % len(prompts)] for i in range(batch)]
    prefill_steps = batch + math.ceil(sum(map(len, chosen)) / step_budget)
    ids = [model.submit(prompt, prefill_steps + steps + 1) for prompt in chosen]
    try:
        for _ in range(prefill_steps + 1):
            served = model.step()
            if served.preempted:
                return None
            if served.batch_tokens == served.running == batch and not served.waiting:
                break
        else:
            raise RuntimeError(f"the {batch} requests did not all decode after {prefill_steps} steps")
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            served = model.step()
            times.append(time.perf_counter() - started)
            if served.preempted:
                return None
            if served.batch_tokens != batch:
                raise RuntimeError(f"a timed step decoded {served.batch_tokens} requests, not {batch}")
        return statistics.median(times)
    finally:
        for request_id in ids:
            model.cancel(request_id)


def measure_steps(model: Any, prompts: Sequence[Sequence[int]], batches: Sequence[int], steps: int,
                  step_budget: int) -> dict[str, dict[int, float | None]]:
    """{kept: {batch: median decode step s, or None where the budget does not hold the batch}} on one
    cluster (what is kept may change while no request runs), after an untimed warm-up."""
    seconds: dict[str, dict[int, float | None]] = {kept: {} for kept in KEPT}
    decode_step_s(model, prompts, batches[0], 2, step_budget)  # warm-up: the first kind measured must not pay it
    for turn, batch in enumerate(batches):
        for kept in list(KEPT)[::1 if turn % 2 == 0 else -1]:  # the order alternates: drift is shared
            model.keep(*KEPT[kept])
            seconds[kept][batch] = decode_step_s(model, prompts, batch, steps, step_budget)
    model.keep(False, False)
    return seconds


def requests_held(model: Any, budget: int, block_size: int, mean_tokens: float) -> dict[str, int]:
    """How many requests of `mean_tokens` positions each device's KV budget holds, by what is kept."""
    from request_scheduler import BlockCosts, requests_held as held

    costs = BlockCosts.for_model(model.config, block_size, model.dtype.itemsize)
    return {kept: held(model.assignment, costs, budget, block_size, hidden, replica, mean_tokens)
            for kept, (hidden, replica) in KEPT.items()}


def insurance_rows(seconds: dict[str, dict[int, float | None]], held: dict[str, int]) -> list[dict[str, Any]]:
    """One row per kind of keeping: its step time and throughput at every batch (None where the
    budget does not hold the batch), and the requests held."""
    def given_up(batch: int, step_s: float | None) -> float | None:
        plain = seconds["nothing kept"][batch]
        return None if step_s is None or plain is None else 1 - plain / step_s

    rows = []
    for kept, by_batch in seconds.items():
        rows.append({"kept": kept, "requests_held": held[kept],
                     "decode_step_ms": {b: None if s is None else s * 1000 for b, s in by_batch.items()},
                     "output_throughput": {b: None if s is None else b / s for b, s in by_batch.items()},
                     "throughput_given_up": {b: given_up(b, s) for b, s in by_batch.items()}})
    return rows


def break_even(rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each recovery strategy run with a failure: the seconds its whole interruption saves against
    full recompute's, and the failures per hour at which its insurance pays (None: it saves no time,
    whatever it keeps, or the batch does not fit with what it keeps; 0: it keeps nothing, or keeping
    cost no measurable throughput)."""
    by_kept = {row["kept"]: row for row in rows}
    full = next((r for r in runs if r["strategy"] == "full-recompute" and r.get("interruption_s") is not None), None)
    out = []
    for run in runs:
        if run["strategy"] not in STRATEGY_KEEPS or run is full or run.get("interruption_s") is None or full is None:
            continue
        saved = full["interruption_s"] - run["interruption_s"]
        given_up = by_kept[STRATEGY_KEEPS[run["strategy"]]]["throughput_given_up"]
        out.append({"strategy": run["strategy"], "standby_weights": run["standby_weights"], "saved_s": saved,
                    "break_even_failures_per_hour": {b: _break_even(g, saved) for b, g in given_up.items()}})
    return out


def _break_even(given_up: float | None, saved_s: float) -> float | None:
    if given_up is None or saved_s <= 0:
        return None
    return 3600 * given_up / saved_s if given_up > 0 else 0.0
