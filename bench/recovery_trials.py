"""One trial of bench_recovery.py: a fresh cluster at context L, a crash, the post-failure state,
and every strategy's rebuild and whole interruption timed from it.

Apart from the script because it needs torch and the engine, which the script imports only once
its arguments are known to be good.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from common import log
from cluster_leader import FailureEvent, PostFailure, StepFailed
from demo_options import DEFAULT_PROMPT
from demo_scenario import build_prompt, keep_state_for
from device_protocol import RecoveryPolicy
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama
from head_assignment import even_assignment
from heartbeat_detection import HeartbeatConfig
from kv_cache_reused import STRATEGIES as RECOVERY_STRATEGIES
from llama_model_loader import Checkpoint
from performance_comparator import (Timing, kept_bytes, measure_copy_bandwidth, measure_keeping_cost, recovery_flops,
                                    time_rebuilds)
from interruption_phases import add_interruption_ratios, interruption
from tensor_parallel_cluster import open_checkpoint


# --------------------------------------------------------------------------------------------
# Clusters


@dataclass
class ClusterFactory:
    """New clusters of `devices` devices on one checkpoint (each device reads its own slices)."""

    folder: Path
    devices: int
    dtype: torch.dtype
    heartbeat: HeartbeatConfig
    backend: str = "threads"
    weights: str = "read"  # or "standby": every device holds in advance what it would inherit

    def __post_init__(self) -> None:
        self.location, self.checkpoint, _ = open_checkpoint(self.folder, log)
        self.assignment = even_assignment(self.checkpoint.config, self.devices)

    def new(self, reassign: str, seed: int) -> FaultTolerantLlama:
        """A cluster whose leader holds after a failure, so that every strategy runs from one state."""
        policy = RecoveryPolicy(reassign=reassign, seed=seed, hold=True, standby_weights=self.weights == "standby")
        return FaultTolerantLlama.from_checkpoint(self.location, self.checkpoint, self.assignment, self.dtype,
                                                  heartbeat=self.heartbeat, policy=policy, backend=self.backend)


# --------------------------------------------------------------------------------------------
# One trial: a cluster at context L, a crash, and the post-failure state


@dataclass
class Trial:
    backend: str
    devices: int
    detector: str
    weights: str
    reassign: str
    context: int
    prefill_s: float
    detection_s: float
    declared_by: str
    regroup_s: float
    weight_load_s: float
    weight_bytes: int
    standby_bytes: int
    receivers: str
    rebuilt_kv_heads: int
    overhead: dict[str, Timing] | None
    rows: list[dict]


def post_failure_at(model: FaultTolerantLlama, context: int, fail_device: int, strategies: Sequence[str],
                    overhead_repeats: int) -> tuple[PostFailure, FailureEvent, float, dict[str, Timing] | None, int]:
    """Fill the cache to `context` tokens keeping what `strategies` need, crash a device mid-step,
    let the leader declare it, reassign and inherit weights. Returns the post-failure state, the
    failure, the prefill seconds, the per-step overhead (when `overhead_repeats`) and the token of
    the abandoned step."""
    prompt_ids = build_prompt(model.tokenizer, DEFAULT_PROMPT, context - 1)[:context - 1]
    keep_state_for(model, strategies)
    started = time.perf_counter()
    token = int(model.prefill(prompt_ids).argmax())
    prefill_s = time.perf_counter() - started
    model.decode(token)  # the context is now L tokens
    # decode steps that recompute position L-1 (the cache does not grow)
    overhead = measure_keeping_cost(model, overhead_repeats, prefill_repeats=0).decode if overhead_repeats else None
    model.arm(FailurePlan(fail_device, after_tokens=1))
    try:
        model.decode(token)
        raise RuntimeError("the injected failure did not abandon the step")
    except StepFailed as failure:
        (event,) = failure.events
    post = model.prepare_recovery()
    if len(post.context_ids) != context:
        raise RuntimeError(f"context at the failure is {len(post.context_ids)} tokens, not {context}")
    return post, event, prefill_s, overhead, token


def run_trial(factory: ClusterFactory, context: int, reassign: str, args: argparse.Namespace,
              with_overhead: bool) -> Trial:
    model = factory.new(reassign, args.seed)
    redo: dict[str, float] = {}
    try:
        standby_bytes = sum(info.standby_bytes for info in model.describe().values())
        post, event, prefill_s, overhead, token = post_failure_at(
            model, context, args.fail_device, args.strategies, max(3, args.repeats) if with_overhead else 0)
        detection_s = model.detection_latency_s(event)
        log(f"  prefill {prefill_s:.2f} s; Device-{event.device} declared dead after {detection_s:.3f} s "
            f"({event.detection.signal}); regroup {post.regroup_s:.3f} s; weights {post.weight_load_s:.3f} s; "
            f"timing {len(args.strategies)} strategies x {args.repeats}")

        def redo_step(name: str) -> None:
            started = time.perf_counter()
            model.decode(token)
            redo[name] = time.perf_counter() - started

        timings, errors = time_rebuilds(model, args.strategies, args.repeats, after_last=redo_step)
    finally:
        model.close()
    baseline = timings.get("full-recompute")
    full_flops = recovery_flops("full-recompute", model.config, post)
    shared = {"detection_s": detection_s, "regroup_s": post.regroup_s, "weights_s": post.weight_load_s}
    rows = []
    for name in args.strategies:
        timing, flops = timings.get(name), recovery_flops(name, model.config, post)
        row = {"backend": factory.backend, "devices": factory.devices, "detector": factory.heartbeat.detector,
               "weights": factory.weights, "reassign": reassign, "context": context, "strategy": name,
               "keeps": RECOVERY_STRATEGIES[name].keeps, "error": errors.get(name), "flops": flops,
               "flop_ratio": full_flops / flops if flops else None,  # None: the strategy does no FLOPs
               "kept_bytes_per_token": kept_bytes(name, post) / context}
        if timing:
            row |= {**timing.as_json(), "speedup": baseline.median / timing.median if baseline else None,
                    **interruption(shared, timing.seconds, redo[name])}
            log(f"    {name:<15} median {timing.median:.4f} s; redo {redo[name]:.3f} s; "
                f"whole interruption {row['interruption_s']:.3f} s")
        rows.append(row)
    add_interruption_ratios(rows, "strategy")
    plan = post.plans[-1]
    receivers = ", ".join(f"Device-{d}" for d in plan.moved_heads)
    rebuilt = sum(len(set(post.assignment.kv_heads(d)) - set(info.kv_heads)) for d, info in post.survivors.items())
    return Trial(factory.backend, factory.devices, factory.heartbeat.detector, factory.weights, reassign, context,
                 prefill_s, detection_s, event.detection.signal, post.regroup_s, post.weight_load_s,
                 post.weight_bytes, standby_bytes, receivers, rebuilt, overhead, rows)


def copy_bandwidth_text(folder: Path, dtype: torch.dtype) -> str:
    """This machine's conversion bandwidth from the checkpoint's dtype to `dtype`, one thread: the
    yardstick for the new owners' inheritance rate."""
    c = measure_copy_bandwidth(Checkpoint(folder).embedding_dtype, dtype)
    return (f"{c['fresh_bytes_per_s'] / 1e9:.2f} GB/s into new memory, {c['warm_bytes_per_s'] / 1e9:.2f} GB/s into "
            f"memory already touched")
