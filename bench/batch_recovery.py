"""bench_recovery.py's batch section: the interruption of each strategy against the tokens in flight.

For each number of requests (`--batch-requests`, prompts of up to `--batch-context` tokens), one
failure-free run gives every request's greedy tokens; then, per strategy, a fresh cluster keeps what
the strategy needs, serves the same requests, and a device crashes once every request has decoded
a token. The leader recovers on its own with the strategy; the interruption, detection apart, is the
recovery's own time (the new owners' weight slices + the rebuild of every running request's KV,
cluster_leader.Recovery), and every request's tokens must equal the failure-free run's. What a
strategy keeps is paged with the KV in the same budget, so the table also says how many such
requests the budget holds with that kept state (cluster_leader.pool_blocks), and a strategy whose
kept state does not fit the requests is not run: the table says so.
"""
from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from common import log, torch_dtype

if TYPE_CHECKING:
    import torch

    from head_assignment import Assignment
    from llama_config import LlamaConfig
    from request_scheduler import SchedulerConfig

KEEPING = {"full-recompute": (False, False), "reuse-replay": (False, False), "reuse-hidden": (True, False),
           "replicate": (False, True)}  # (hidden states, KV replica) each strategy needs kept


@dataclass
class BatchRecovery:
    """One (requests, strategy) run: its capacity and, if it ran, its recovery and whether it was lossless."""
    requests: int
    strategy: str
    holds: int                       # requests of this length the budget holds with the strategy's kept state
    tokens_in_flight: int = 0        # positions rebuilt over every running request (Recovery.context_tokens)
    ran_as: str = ""                 # the strategy the leader ran (a fallback says why)
    weight_load_s: float = 0.0
    rebuild_s: float = 0.0
    preempted: int = 0               # requests the recovery preempted (a pool that holds fewer afterwards)
    lossless: bool | None = None     # None: not run (does not fit)

    @property
    def interruption_s(self) -> float:
        return self.weight_load_s + self.rebuild_s


def requests_held(config: LlamaConfig, assignment: Assignment, dtype: torch.dtype, scheduling: SchedulerConfig,
                  strategy: str, positions: int) -> int:
    """How many requests of `positions` the budget holds on `assignment` with what `strategy` keeps
    (0 when it holds not even one block)."""
    from request_scheduler import BlockCosts, requests_held as held

    size = scheduling.block_size
    costs = BlockCosts.for_model(config, size, dtype.itemsize)
    return held(assignment, costs, scheduling.kv_cache_memory_bytes, size, *KEEPING[strategy], positions)


@dataclass
class Served:
    outputs: list[list[int]]
    recoveries: list
    preempted: int  # requests preempted by the recovery (its pool holds fewer)


def serve(folder: Path, args: argparse.Namespace, scheduling: SchedulerConfig, prompts: Sequence[Sequence[int]],
          strategy: str | None) -> Served:
    """The prompts served to the end; with a strategy, Device-`--fail-device` crashes once every
    request has decoded a token, and the leader recovers with it."""
    from device_protocol import RecoveryPolicy
    from fault_injection import FailurePlan
    from fault_tolerant_cluster import FaultTolerantLlama

    policy = RecoveryPolicy(reassign=args.reassign[0], seed=args.seed, strategy=strategy or "full-recompute")
    with FaultTolerantLlama.load(folder, devices=args.devices[0], dtype=torch_dtype(args.dtype),
                                 log=lambda m: None, heartbeat=args.heartbeats[args.detector[0]], policy=policy,
                                 scheduling=scheduling) as model:
        model.keep(*KEEPING[strategy or "full-recompute"])
        decoded: set[int] = set()
        preempted = []
        armed = strategy is None

        def after_step(served) -> None:
            nonlocal armed
            decoded.update(served.tokens)
            if served.recoveries:
                preempted.extend(served.preempted)
            if not armed and len(decoded) == len(prompts):
                model.arm(FailurePlan(args.fail_device))
                armed = True
        outputs = model.generate_batch(prompts, args.batch_new_tokens, after_step=after_step)
        served = Served(outputs, list(model.recoveries), len(preempted))
    gc.collect()  # the closed cluster's weights are in reference cycles: free them before the next one loads
    return served


def scheduling_for(args: argparse.Namespace, requests: int) -> SchedulerConfig:
    from request_scheduler import SchedulerConfig

    return SchedulerConfig(int(args.batch_kv_budget * 2**20), max_num_seqs=requests)


def measure(folder: Path, args: argparse.Namespace) -> list[BatchRecovery]:
    """Every (requests, strategy): its capacity, and where the requests fit, its recovery."""
    from batch_runners import ragged_prompts
    from head_assignment import even_assignment
    from llama_model_loader import Checkpoint

    config = Checkpoint(folder).config
    assignment, positions = even_assignment(config, args.devices[0]), args.batch_context + args.batch_new_tokens
    runs = []
    for requests in args.batch_requests:
        scheduling = scheduling_for(args, requests)
        prompts = ragged_prompts(config.vocab_size, requests, args.batch_context, args.seed)
        free = None
        for strategy in args.strategies:
            run = BatchRecovery(requests, strategy, requests_held(config, assignment, torch_dtype(args.dtype),
                                                                  scheduling, strategy, positions))
            runs.append(run)
            if run.holds < requests:
                continue
            if free is None:
                log(f"batch of {requests}: the failure-free run")
                free = serve(folder, args, scheduling, prompts, None).outputs
            log(f"batch of {requests}: {strategy}")
            started = time.perf_counter()
            record(run, free, serve(folder, args, scheduling, prompts, strategy), time.perf_counter() - started)
    return runs


def record(run: BatchRecovery, free: list[list[int]], served: Served, seconds: float) -> None:
    """The run's one recovery into its row (more than one, or none, is an error: the trial is wrong)."""
    if len(served.recoveries) != 1:
        raise RuntimeError(f"{run.strategy} with {run.requests} requests: {len(served.recoveries)} recoveries, not 1 "
                           f"(run took {seconds:.1f} s)")
    (recovery,) = served.recoveries
    run.lossless, run.tokens_in_flight, run.preempted = served.outputs == free, recovery.context_tokens, served.preempted
    run.weight_load_s, run.rebuild_s = recovery.weight_load_s, recovery.rebuild_s
    run.ran_as = recovery.strategy + (f" (fell back: {recovery.fallback_reason})" if recovery.fallback_reason else "")


def batch_table(runs: Sequence[BatchRecovery]) -> str:
    """One row per (requests, strategy); full / this compares with full recompute at the same requests."""
    lines = ["| requests | tokens in flight | strategy | requests the budget holds | weights s | rebuild s | "
             "**interruption s** | full / this | preempted by it | ran as | lossless |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    full = {r.requests: r for r in runs if r.strategy == "full-recompute" and r.lossless is not None}
    for run in runs:
        if run.lossless is None:
            lines.append(f"| {run.requests} | - | {run.strategy} | {run.holds} | does not fit: the budget holds "
                         f"{run.holds} such requests with this strategy's kept state | | | | | | |")
            continue
        base = full.get(run.requests)
        ratio = f"{base.interruption_s / run.interruption_s:.1f}x" if base and run.interruption_s > 0 else "-"
        lines.append(f"| {run.requests} | {run.tokens_in_flight} | {run.strategy} | {run.holds} | "
                     f"{run.weight_load_s:.3f} | {run.rebuild_s:.3f} | **{run.interruption_s:.3f}** | {ratio} | "
                     f"{run.preempted} | {run.ran_as} | {'yes' if run.lossless else 'NO'} |")
    return "\n".join(lines)


def batch_section(folder: Path, args: argparse.Namespace) -> str:
    """The section's Markdown."""
    runs = measure(folder, args)
    return "\n".join([
        "## The interruption against the tokens in flight (many requests)\n",
        f"{args.dtype}; {args.devices[0]} devices on threads; {', '.join(map(str, args.batch_requests))} requests "
        f"with prompts from {args.batch_context // 2} to {args.batch_context} tokens, {args.batch_new_tokens} new "
        f"tokens each; KV budget {args.batch_kv_budget:g} MiB per device (what a strategy keeps costs the same "
        f"budget); {args.reassign[0]} reassignment; Device-{args.fail_device} crashes once every request has "
        f"decoded a token, and the leader recovers with the strategy on its own, one run each. Interruption: the "
        f"recovery's own time, the new owners' weight slices + the rebuild of every running request's KV "
        f"(detection apart). Lossless: every request's tokens equal the failure-free run's.\n",
        batch_table(runs)])
