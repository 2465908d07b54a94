"""The whole interruption after a device failure, and the KV-cache rebuild of every recovery
strategy, against context length, reassignment, device count, backend, detector and weights.

What it measures, for each `--backend`, `--devices` count, `--detector`, `--weights` source,
`--reassign` strategy and `--lengths` context L (one "trial" each):
  * a fresh cluster prefills L-1 prompt tokens and decodes one, keeping what every strategy needs
    (hidden-state checkpoints and the buddy's KV replica), so the context at the failure is L;
  * the per-step cost of keeping them (performance_comparator.measure_keeping_cost: decode steps
    at the same position with nothing kept, hidden states, KV replica, alternating), once per
    (devices, L), on the first reassignment's trial, before the failure;
  * Device-`--fail-device` crashes mid-step; the leader declares it dead and holds; asked by this
    script, it reassigns the heads and the new owners read their weight slices (prepare_recovery);
  * from that one post-failure state, every strategy rebuilds the KV cache `--repeats` times,
    alternating with a rotated order, each run from the survivors' snapshot (performance_comparator.time_rebuilds);
    after its last rebuild, the abandoned step is redone (the next token), timed;
  * the whole interruption of each strategy: detection (the fault's moment to its declaration) +
    regroup (fencing, the survivors' first call on the new group) + weights (the new owners' slices:
    read, or taken from standby with `--weights standby`) + its rebuild (median) + the redo.
FLOPs are counted from shapes (recovery_flops); "kept" is the state the survivors keep during
normal running for the strategy (kept_bytes), per token of context.

How: a crash removes a device from its cluster, so each trial runs on a new cluster (device actors,
each reading its own slices from the page-cached checkpoint). Heartbeats are the seed's (1 s, 5 s
timeout) unless given: detection is part of the interruption. On threads a crash is found by
silence (the detector matters); on processes a SIGKILLed device is found at its exit.
Lossless checks are the demo's and the tests' job: this script only times.

Memory: the 1B model in fp32 holds about 5 GB of weights; each survivor keeps 128 KiB of hidden
states per token (read, not copied, by the strategy runs; the store grows by doubling), and a copy
of its KV for the snapshot; plan --lengths by memory.

How to read it: median (min-max) seconds; speedup = full-recompute median / strategy median from
the same trial; FLOP ratio likewise from FLOPs. On a shared 2-core machine numbers are noisy.

    KV_REUSE_CACHE=/tmp/kvcache python bench/bench_recovery.py --quick
    python bench/bench_recovery.py                   # lengths 128 512 2048, 4 and 8 devices, 3 repeats
    python bench/bench_recovery.py --lengths 512 --devices 4 --backend processes --weights standby \
        --reassign random --strategies replicate    # the issue's target: kill to next token
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common import DTYPES, GB, REPO, machine, memory_status, model_folder

import torch

from cluster_leader import FailureEvent, PostFailure, StepFailed
from device_protocol import RecoveryPolicy
from execution_optimization_algorithm_demo import DEFAULT_PROMPT, build_prompt, keep_state_for
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama
from head_assignment import even_assignment
from heartbeat_detection import DETECTORS, HeartbeatConfig
from kv_cache_reused import STRATEGIES as RECOVERY_STRATEGIES
from llama_model_loader import Checkpoint
from performance_comparator import (Timing, kept_bytes, measure_copy_bandwidth, measure_keeping_cost, recovery_flops,
                                    time_rebuilds)
from recovery_plots import plot_recovery_vs_context
from recovery_report import PHASES, add_interruption_ratios, interruption
from task_reassign import STRATEGIES as REASSIGN_STRATEGIES
from tensor_parallel_cluster import open_checkpoint

DEFAULT_PLOT = REPO / "docs" / "recovery_vs_context.png"
QUICK_PLOT = Path("/tmp/recovery_vs_context_quick.png")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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
               "flop_ratio": full_flops / flops if flops else float("inf"),
               "kept_bytes_per_token": kept_bytes(name, post) / context}
        if timing:
            row |= {"seconds": list(timing.seconds), "min_s": timing.min, "median_s": timing.median,
                    "max_s": timing.max, "speedup": baseline.median / timing.median if baseline else None,
                    **interruption(shared, timing.median, redo[name])}
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


# --------------------------------------------------------------------------------------------
# Tables


def ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if value == float("inf") else f"{value:.1f}x"


TRIAL_COLUMNS = "| backend | devices | detector | weights | reassign | context |"
TRIAL_ALIGN = "|---|---:|---|---|---|---:|"


def trial_cells(t: Trial) -> str:
    return f"| {t.backend} | {t.devices} | {t.detector} | {t.weights} | {t.reassign} | {t.context} |"


def recovery_table(trials: Sequence[Trial]) -> str:
    lines = [TRIAL_COLUMNS + " strategy | median s (min-max) | speedup | GFLOP | FLOP ratio | kept KiB/token |",
             TRIAL_ALIGN + "---|---|---:|---:|---:|---:|"]
    for trial in trials:
        for row in trial.rows:
            if row.get("median_s") is None:
                timing = f"could not run: {row['error']}"
            else:
                timing = f"{row['median_s']:.4f} ({row['min_s']:.4f}-{row['max_s']:.4f})"
            lines.append(f"{trial_cells(trial)} {row['strategy']} | {timing} | {ratio(row.get('speedup'))} | "
                         f"{row['flops'] / 1e9:.2f} | {ratio(row['flop_ratio'])} | "
                         f"{row['kept_bytes_per_token'] / 1024:.1f} |")
    return "\n".join(lines)


def interruption_table(trials: Sequence[Trial]) -> str:
    """The whole interruption of every strategy, phase by phase, and its ratio to full recompute's."""
    lines = [TRIAL_COLUMNS + " strategy | detect s | regroup s | weights s | rebuild s | redo s | **total s** | "
             "full / this |", TRIAL_ALIGN + "---|---:|---:|---:|---:|---:|---:|---:|"]
    for trial in trials:
        for row in trial.rows:
            phases = row.get("interruption_phases")
            if not phases:
                continue
            cells = " | ".join(f"{phases[key]:.3f}" for key, _ in PHASES)
            lines.append(f"{trial_cells(trial)} {row['strategy']} | {cells} | **{row['interruption_s']:.3f}** | "
                         f"{ratio(row['interruption_ratio'])} |")
    return "\n".join(lines)


def trial_table(trials: Sequence[Trial]) -> str:
    lines = [TRIAL_COLUMNS + " lost heads go to | KV heads rebuilt | prefill s | declared by | weights MB | MB/s | "
             "standby MB held |", TRIAL_ALIGN + "---|---:|---:|---|---:|---:|---:|"]
    for t in trials:
        rate = f"{t.weight_bytes / 1e6 / t.weight_load_s:.0f}" if t.weight_load_s > 0 else "-"
        lines.append(f"{trial_cells(t)} {t.receivers} | {t.rebuilt_kv_heads} | {t.prefill_s:.2f} | {t.declared_by} | "
                     f"{t.weight_bytes / 1e6:.0f} | {rate} | {t.standby_bytes / 1e6:.0f} |")
    return "\n".join(lines)


def overhead_table(trials: Sequence[Trial]) -> str:
    lines = ["| backend | devices | context | nothing kept ms/step | hidden states ms/step | KV replica ms/step |",
             "|---|---:|---:|---:|---:|---:|"]
    for t in trials:
        if not t.overhead:
            continue
        base = t.overhead["nothing kept"].median

        def cell(mode: str) -> str:
            timing = t.overhead.get(mode)
            if timing is None:
                return "-"
            return f"{timing.median * 1e3:.1f} ({timing.median / base - 1:+.1%})"
        lines.append(f"| {t.backend} | {t.devices} | {t.context} | {base * 1e3:.1f} | {cell('hidden states')} | "
                     f"{cell('KV replica')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def copy_bandwidth_text(stored: torch.dtype, dtype: torch.dtype) -> str:
    c = measure_copy_bandwidth(stored, dtype)
    return (f"{c['fresh_bytes_per_s'] / 1e9:.2f} GB/s into new memory, {c['warm_bytes_per_s'] / 1e9:.2f} GB/s into "
            f"memory already touched")


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model-dir", help="checkpoint folder (default: the synthetic Llama-3.2-1B, $KV_REUSE_CACHE)")
    add("--lengths", type=int_list, nargs="+", default=[[128, 512, 2048]],
        help="context lengths, e.g. 128 512 or 128,512 (default 128 512 2048)")
    add("--devices", type=int_list, nargs="+", default=[[4, 8]], help="device counts (default 4 8)")
    add("--reassign", nargs="+", choices=REASSIGN_STRATEGIES, default=list(REASSIGN_STRATEGIES),
        help="reassignment strategies (default random balanced)")
    add("--strategies", nargs="+", choices=tuple(RECOVERY_STRATEGIES), default=list(RECOVERY_STRATEGIES),
        help="recovery strategies (default all)")
    add("--repeats", type=int, default=3, help="timed runs of each strategy per trial (default 3)")
    add("--dtype", choices=tuple(DTYPES), default="float32", help="compute dtype (default float32)")
    add("--backend", nargs="+", choices=("threads", "processes"), default=["threads"],
        help="device backends, one after the other (default threads)")
    add("--fail-device", type=int, default=1, help="the device that crashes (default 1)")
    add("--seed", type=int, default=0, help="seed of the random reassignment (default 0)")
    add("--detector", nargs="+", choices=DETECTORS, default=["timeout"],
        help="failure detectors, one after the other (default timeout; phi: phi accrual)")
    add("--phi-threshold", type=float, default=8.0, help="phi accrual's threshold (default 8)")
    add("--weights", nargs="+", choices=("read", "standby"), default=["read"],
        help="where the new owners' slices come from: read from the checkpoint at the failure (default), or "
             "standby (read in advance by every device)")
    add("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats (default 1, the seed's)")
    add("--heartbeat-timeout", type=float, default=5.0,
        help="silence before a device is dead, fixed detector (default 5, the seed's)")
    add("--plot", type=Path, help=f"recovery-vs-context PNG (default {DEFAULT_PLOT.relative_to(REPO)}; "
                                  f"with --quick {QUICK_PLOT})")
    add("--json", type=Path, help="also write every measurement as JSON here")
    add("--quick", action="store_true", help="smoke run: lengths 64 128, 4 devices, 1 repeat")
    args = parser.parse_args(argv)
    args.lengths, args.devices = sum(args.lengths, []), sum(args.devices, [])
    if args.quick:
        args.lengths, args.devices, args.repeats = [64, 128], [4], 1
    args.plot = args.plot or (QUICK_PLOT if args.quick else DEFAULT_PLOT)
    if args.repeats < 1 or min(args.lengths) < 2 or min(args.devices) < 2:
        parser.error("--repeats must be >= 1, --lengths >= 2, --devices >= 2")
    if not 0 <= args.fail_device < min(args.devices):
        parser.error(f"--fail-device {args.fail_device} does not exist with {min(args.devices)} devices")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    folder = model_folder(args.model_dir)
    dtype = DTYPES[args.dtype]
    started = time.perf_counter()
    trials: list[Trial] = []
    for backend, devices, detector, weights in itertools.product(args.backend, args.devices, args.detector,
                                                                 args.weights):
        heartbeat = HeartbeatConfig(args.heartbeat_interval, args.heartbeat_timeout, detector, args.phi_threshold)
        factory = ClusterFactory(folder, devices, dtype, heartbeat, backend, weights)
        first = (detector, weights) == (args.detector[0], args.weights[0])
        for r, reassign in enumerate(args.reassign):
            for context in args.lengths:
                log(f"{backend}: {devices} devices, {detector} detector, weights {weights}, {reassign} "
                    f"reassignment, {context}-token context ({time.perf_counter() - started:.0f} s so far)")
                trials.append(run_trial(factory, context, reassign, args, with_overhead=first and r == 0))
                gc.collect()
        del factory
        gc.collect()

    print("## The whole interruption after a device failure, by context length\n")
    print(f"Checkpoint {folder}; {args.dtype}; Device-{args.fail_device} crashes; {args.repeats} alternating runs "
          f"per strategy per trial; heartbeats every {args.heartbeat_interval} s (timeout {args.heartbeat_timeout} s, "
          f"phi threshold {args.phi_threshold}); {machine()}; copy bandwidth (the checkpoint's dtype to {args.dtype}, "
          f"one thread) {copy_bandwidth_text(Checkpoint(folder).embedding_dtype, dtype)}; "
          f"total {time.perf_counter() - started:.0f} s; peak RSS {memory_status()['VmHWM'] / GB:.1f} GB.\n")
    print(interruption_table(trials))
    print("\ndetect: the fault to its declaration; regroup: fencing, the survivors' first call on the new group, "
          "cutting them to the leader's record; weights: the new owners' slices; rebuild: the KV cache (median); redo: the abandoned step, which gives "
          "the next token; full / this: full recompute's whole interruption over this strategy's.\n")
    print("## KV-cache rebuild alone\n")
    print(recovery_table(trials))
    print("\nspeedup = full-recompute median / strategy median (same trial); FLOP ratio likewise from FLOPs "
          "counted from shapes; kept = state the survivors keep during normal running for the strategy.\n")
    print(trial_table(trials))
    print("\nPer decode step, same position, alternating (median ms; change against nothing kept):\n")
    print(overhead_table(trials))

    plotted = args.backend[0]  # one backend's lines, first detector and weights (the tables give every one)
    rows = [row for trial in trials for row in trial.rows if row.get("median_s") is not None
            and (row["backend"], row["detector"], row["weights"]) == (plotted, args.detector[0], args.weights[0])]
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_recovery_vs_context(rows, args.plot,
                                    f"KV rebuild after a device failure ({args.dtype}, {plotted}, median of {args.repeats})")
    whole = plot_recovery_vs_context(rows, args.plot.with_name(args.plot.stem + "_interruption.png"),
                                     f"The whole interruption, failure to next token ({args.dtype}, {plotted}, "
                                     f"{args.detector[0]} detector, weights {args.weights[0]})",
                                     measure="interruption_s", ylabel="failure to next token")
    print(f"\nplots: {plot}, {whole}")
    if args.json:
        args.json.write_text(json.dumps([{**vars(t), "overhead": {m: list(x.seconds) for m, x in
                                                                  (t.overhead or {}).items()}} for t in trials],
                                        indent=2))
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
