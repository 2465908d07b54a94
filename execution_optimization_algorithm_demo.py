"""The seed scenario, end to end: what does losing a device cost, and how much does KV reuse save?

Loads Llama-3.2-1B (real if found, else synthetic), splits it by heads over device threads, runs a
failure-free reference, then the same generation in which a device crashes mid-step. The leader
detects it by heartbeat timeout, reassigns its heads, the new owners read the weight slices they
inherit, and the KV cache is rebuilt by every recovery strategy from the same post-failure state:
timed, counted, checked lossless. The report goes to /tmp/kv_cache_performance_report.txt (+ .json),
with a per-device timeline picture of the run beside it (kv_cache_timeline.png).

    python execution_optimization_algorithm_demo.py --help
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

from cluster_leader import StepFailed
from device_processes import LaunchError
from device_protocol import RecoveryPolicy
from device_threads import StepAbandoned, interrupts_at_wait_points
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama
from head_assignment import even_assignment
from heartbeat_detection import DETECTORS, HeartbeatConfig
from kv_cache_reused import STRATEGIES as RECOVERY_STRATEGIES
from llama_model_loader import CheckpointError, LlamaConfig
from performance_comparator import (StrategyOutcome, Timing, compare_device_level, compare_recoveries,
                                    failure_free_run, measure_copy_bandwidth, measure_keeping_cost)
from recovery_plots import plot_timeline
from recovery_report import (Report, add_interruption_ratios, check_writable, interruption, json_path, render,
                             render_comparison, render_interruption, write_report)
from synthetic_checkpoint import is_synthetic_checkpoint
from task_reassign import STRATEGIES as REASSIGN_STRATEGIES
from tensor_parallel_cluster import open_checkpoint
from device_actor import DTYPES

DEFAULT_PROMPT = "The history of fault tolerance in distributed computing begins with"
DEFAULT_REPORT = Path("/tmp/kv_cache_performance_report.txt")
TIMELINE_NAME = "kv_cache_timeline.png"  # written in the report's folder
PREFILL_REPEATS = 2  # warm prefills per keeping mode in the cost of keeping state (each is a whole prefill)


class UsageError(Exception):
    """Arguments that cannot describe a run (the message is one line)."""


@dataclass(frozen=True)
class Options:
    model_dir: Path | None
    devices: int
    fail_device: int
    fail_after: int
    prompt: str
    context_tokens: int | None
    new_tokens: int
    reassign: str
    recovery: tuple[str, ...]
    heartbeat_interval: float
    heartbeat_timeout: float
    dtype: str
    repeats: int
    report: Path
    seed: int
    quiet: bool
    backend: str = "threads"
    detector: str = "timeout"
    phi_threshold: float = 8.0
    standby_weights: bool = False
    accelerator: str = "cpu"

    @property
    def heartbeat(self) -> HeartbeatConfig:
        return HeartbeatConfig(self.heartbeat_interval, self.heartbeat_timeout, self.detector, self.phi_threshold)


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (UsageError) instead of usage text and exit."""

    def error(self, message: str):
        raise UsageError(message)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = _Parser(
        description="Crash a device in the middle of tensor-parallel generation and compare how fast each "
                    "strategy rebuilds the KV cache (all measured in this run).")
    add = parser.add_argument
    add("--model-dir", type=Path, help="checkpoint folder (config.json + safetensors); default: $LLAMA_CHECKPOINT, "
                                       "the Hugging Face cache, else a synthetic Llama-3.2-1B")
    add("--devices", type=int, default=4, help="simulated devices (default 4)")
    add("--backend", choices=("threads", "processes"), default="threads",
        help="threads: every device a thread of this process (default); processes: every device an OS process, "
             "collectives on torch.distributed (gloo), the crash a real SIGKILL (see README for two hosts)")
    add("--accelerator", choices=("cpu", "cuda"), default="cpu",
        help="cpu (default), or cuda with --backend processes: every device process computes on a GPU of its "
             "own, collectives on NCCL (see README: written for GPUs, not yet run on one)")
    add("--fail-device", type=int, default=1, help="the device that crashes (default 1)")
    add("--fail-after", type=int, default=4, help="generated tokens before the crash (default 4)")
    add("--prompt", default=DEFAULT_PROMPT, help="the prompt text")
    add("--context-tokens", type=int, default=512,
        help="pad the prompt (repeating it) to this many tokens, to time recovery at a chosen length (default 512; "
             "0 keeps the prompt as it is)")
    add("--new-tokens", type=int, default=8, help="tokens to generate in all (default 8)")
    add("--reassign", choices=REASSIGN_STRATEGIES, default="random",
        help="who takes the lost heads: random (all to one survivor, seeded) or balanced (spread, KV groups whole)")
    add("--recovery", choices=("all", *RECOVERY_STRATEGIES), default="all", help="strategies to compare (default all)")
    add("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats (default 1)")
    add("--heartbeat-timeout", type=float, default=5.0,
        help="silence before a device is declared dead, with --detector timeout (default 5)")
    add("--detector", choices=DETECTORS, default="timeout",
        help="how silence is judged: timeout (fixed, the default) or phi (phi accrual: adaptive, from the "
             "observed heartbeat gaps)")
    add("--phi-threshold", type=float, default=8.0,
        help="with --detector phi: the suspicion at which a device is declared dead (default 8: a silence "
             "that long once in 10^8 gaps)")
    add("--standby-weights", action="store_true",
        help="every device also reads, before any failure, the slices it would inherit (costs memory, "
             "reported; inheriting then reads nothing)")
    add("--dtype", choices=tuple(DTYPES), default="float32",
        help="compute dtype (default float32: measured faster than bf16 on CPUs without AMX; see README)")
    add("--repeats", type=int, default=3, help="timed runs of each strategy (default 3)")
    add("--report", type=Path, default=DEFAULT_REPORT,
        help=f"report path (default {DEFAULT_REPORT}; the JSON twin and the timeline picture {TIMELINE_NAME} "
             "go beside it)")
    add("--seed", type=int, default=0, help="seed of the random reassignment (default 0)")
    add("--quiet", action="store_true", help="print only the report's path and the comparison table")
    args = parser.parse_args(argv)
    options = Options(args.model_dir, args.devices, args.fail_device, args.fail_after, args.prompt,
                      args.context_tokens or None, args.new_tokens, args.reassign,
                      tuple(RECOVERY_STRATEGIES) if args.recovery == "all" else (args.recovery,),
                      args.heartbeat_interval, args.heartbeat_timeout, args.dtype, args.repeats, args.report,
                      args.seed, args.quiet, args.backend, args.detector, args.phi_threshold, args.standby_weights,
                      args.accelerator)
    check_options(options)
    return options


def check_options(o: Options) -> None:
    """Everything that can be refused before reading the model."""
    if o.devices < 2:
        raise UsageError(f"--devices must be at least 2 (one to fail, one to survive), got {o.devices}")
    if not 0 <= o.fail_device < o.devices:
        raise UsageError(f"--fail-device {o.fail_device} does not exist (devices are 0..{o.devices - 1})")
    if o.new_tokens < 2:
        raise UsageError(f"--new-tokens must be at least 2 (tokens before and after the failure), got {o.new_tokens}")
    if not 1 <= o.fail_after < o.new_tokens:
        raise UsageError(f"--fail-after must be between 1 and --new-tokens - 1 ({o.new_tokens - 1}), got {o.fail_after}")
    if o.context_tokens is not None and o.context_tokens < 0:
        raise UsageError(f"--context-tokens must not be negative, got {o.context_tokens}")
    if o.accelerator == "cuda" and o.backend != "processes":
        raise UsageError("--accelerator cuda needs --backend processes (one GPU per device process)")
    if o.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {o.repeats}")
    try:
        o.heartbeat
    except ValueError as bad:
        raise UsageError(str(bad)) from None
    try:
        check_writable(o.report)
    except OSError as bad:
        raise UsageError(f"--report {o.report}: {bad}") from None


def check_against_model(o: Options, config: LlamaConfig, prompt_length: int) -> None:
    """What can only be refused once the config is known."""
    if o.devices > config.num_attention_heads:
        raise UsageError(f"--devices {o.devices} is more than the model's {config.num_attention_heads} query heads")
    length = max(prompt_length, o.context_tokens or 0) + o.new_tokens
    if length > config.max_position_embeddings:
        raise UsageError(f"context plus new tokens ({length}) exceed the model's {config.max_position_embeddings} positions")


def build_prompt(tokenizer, prompt: str, context_tokens: int | None) -> list[int]:
    """The tokenized prompt, padded in front with repetitions of itself to `context_tokens`."""
    ids = tokenizer.encode(prompt)
    if context_tokens is None or context_tokens <= len(ids):
        return ids
    bos = ids[:1] if tokenizer.bos_token_id is not None else []
    body = ids[len(bos):] or tokenizer.encode(" ")[len(bos):]
    filler = (body * (context_tokens // len(body) + 1))[:context_tokens - len(ids)]
    return bos + filler + body


# --------------------------------------------------------------------------------------------
# The scenario


def run_scenario(o: Options, log: Callable[[str], None]) -> Report:
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    location, checkpoint, open_seconds = open_checkpoint(o.model_dir, log)
    config = checkpoint.config
    check_against_model(o, config, 0)
    assignment = even_assignment(config, o.devices)
    model = FaultTolerantLlama.from_checkpoint(
        location, checkpoint, assignment, DTYPES[o.dtype], not o.quiet, open_seconds,
        heartbeat=o.heartbeat,
        policy=RecoveryPolicy(o.reassign, o.seed, hold=True, standby_weights=o.standby_weights),  # the comparison
        # drives every recovery
        backend=o.backend, accelerator=o.accelerator)
    kind = "synthetic" if is_synthetic_checkpoint(checkpoint.folder) else "real"
    log(f"model: {checkpoint.folder} ({kind}: {location.reason})")
    try:
        return run_on_model(o, model, started_at, log)
    finally:
        model.close()


def run_on_model(o: Options, model: FaultTolerantLlama, started_at: str, log: Callable[[str], None]) -> Report:
    prompt_ids = build_prompt(model.tokenizer, o.prompt, o.context_tokens)
    check_against_model(o, model.config, len(prompt_ids))
    initial = model.assignment
    system = describe_system(model)

    log(f"failure-free reference run: {len(prompt_ids)}-token context, {o.new_tokens} new tokens")
    reference = failure_free_run(model, prompt_ids, o.new_tokens, o.fail_after)

    keeping = keep_state_for(model, o.recovery)
    log(f"run with a failure: Device-{o.fail_device} crashes after {o.fail_after} tokens (keeping {keeping})")
    before, prefill_keeping_s = generate_until_failure(model, prompt_ids, o, log)
    if before != reference.tokens[:o.fail_after]:
        raise RuntimeError("the run diverged from the failure-free run before the failure")
    post = model.prepare_recovery()
    event, plan = post.events[0], post.plans[-1]
    detection_s = model.detection_latency_s(event)
    log(f"Device-{event.device} declared dead after {detection_s:.2f} s; "
        f"comparing {len(o.recovery)} recovery strategies x {o.repeats}")
    outcomes = compare_recoveries(model, post, o.recovery, o.repeats, reference, o.fail_after, before[-1])
    device_level = compare_device_level(model, post, o.repeats)
    if device_level is not None:  # it left the survivors at the post-failure state: recover (quickly) again
        model.rebuild(min((row for row in outcomes if row.timing), key=lambda row: row.timing.median).name)
    cost = None
    if keeping != "nothing":
        log("cost of keeping state: prefills and decode steps, alternating")
        cost = measure_keeping_cost(model, decode_repeats=max(5, o.repeats), prefill_repeats=PREFILL_REPEATS)

    system["processes"] = model.transport.processes()  # each device process's memory, near the end of the run
    system["copy_bandwidth"] = measure_copy_bandwidth(model.checkpoint.embedding_dtype, DTYPES[o.dtype])
    system |= {"prefill_seconds": reference.prefill_s, "prefill_seconds_keeping": prefill_keeping_s,
               "keeping": keeping, "context_tokens": len(prompt_ids), "new_tokens": o.new_tokens,
               "kept_bytes_per_token": {row.keeps: row.kept_bytes / max(1, len(post.context_ids))
                                        for row in outcomes if row.kept_bytes}}
    timeline = o.report.with_name(TIMELINE_NAME)
    plot_timeline(list(model.events), timeline,
                  f"Device-{event.device} crashes after {o.fail_after} tokens; {o.reassign} reassignment; "
                  f"{len(post.context_ids)}-token context; {len(o.recovery)} strategies x {o.repeats}")
    return {
        "run": {"started": started_at, "backend": o.backend, "accelerator": o.accelerator, "options": {k: str(v) for k, v in vars(o).items()}},
        "model": describe_model(model, o.dtype),
        "system": system,
        "failure": {"device": event.device, "mode": "crash", "after_tokens": o.fail_after,
                    "signal": next((s.signal for s in model.strikes if s.device == event.device), None),
                    "heartbeat_interval_s": o.heartbeat_interval, "heartbeat_timeout_s": o.heartbeat_timeout,
                    "detector": o.detector, "phi_threshold": o.phi_threshold if o.detector == "phi" else None,
                    "detection_latency_s": detection_s, "declared_by": event.detection.signal, "leader": event.leader,
                    "reassign": o.reassign, "plan": plan.describe(), "regroup_seconds": post.regroup_s,
                    "weight_load_seconds": post.weight_load_s, "weight_bytes_inherited": post.weight_bytes,
                    "standby_weights": o.standby_weights, "weights_from_standby": post.weights_from_standby,
                    "initial_assignment": {d: list(h) for d, h in initial.heads.items()},
                    "assignment_after": {d: list(h) for d, h in plan.after.heads.items()}},
        "comparison_meta": {"repeats": o.repeats, "context_tokens": len(post.context_ids)},
        "comparison": comparison_rows(outcomes, {"detection_s": detection_s, "regroup_s": post.regroup_s,
                                                 "weights_s": post.weight_load_s}),
        "device_level": device_level_row(device_level),
        "overhead": {mode: timing_row(t) for mode, t in cost.decode.items()} if cost else None,
        "prefill_overhead": {mode: timing_row(t) for mode, t in cost.prefill.items()} if cost else None,
        "text": describe_text(model, o.prompt, prompt_ids, before, reference.tokens, outcomes, o.fail_after),
        "environment": describe_environment(),
        "files": {"timeline": str(timeline)},
    }


def keep_state_for(model: FaultTolerantLlama, strategies: Sequence[str]) -> str:
    """Switch on, before the failure, what the chosen strategies need kept during normal running."""
    hidden, replication = "reuse-hidden" in strategies, "replicate" in strategies
    model.keep(hidden, replication)
    return " and ".join(name for name, on in (("hidden states", hidden), ("KV replica", replication)) if on) \
        or "nothing"


def generate_until_failure(model: FaultTolerantLlama, prompt_ids: list[int], o: Options,
                           log: Callable[[str], None]) -> tuple[list[int], float]:
    """Generate `fail_after` tokens, then run the step in which the armed device crashes."""
    started = time.perf_counter()
    logits = model.prefill(prompt_ids)
    prefill_s = time.perf_counter() - started
    tokens = [int(logits.argmax())]
    while len(tokens) < o.fail_after:
        tokens.append(int(model.decode(tokens[-1]).argmax()))
    model.arm(FailurePlan(o.fail_device, o.fail_after))
    log(f"Device-{o.fail_device} crashes in this step; waiting for its death to be declared "
        f"(heartbeat timeout {o.heartbeat_timeout} s; a process's exit is seen at once)...")
    try:
        model.decode(tokens[-1])
    except StepFailed:
        return tokens, prefill_s
    raise RuntimeError("the injected failure did not abandon the step")


# --------------------------------------------------------------------------------------------
# Describing the run for the report


def describe_model(model: FaultTolerantLlama, dtype: str) -> dict:
    load = model.load_report
    return {"path": str(load.folder), "source": load.location.source, "reason": load.location.reason,
            "synthetic": is_synthetic_checkpoint(load.folder), "config": model.config.to_dict(),
            "tensor_count": load.tensor_count, "stored_bytes": load.stored_bytes, "stored_dtype": load.stored_dtype,
            "compute_dtype": dtype, "load_seconds": load.seconds}


def describe_system(model: FaultTolerantLlama) -> dict:
    """The devices as they describe themselves, and who holds which KV head twice."""
    a, infos = model.assignment, model.describe()
    return {"devices": len(a.devices), "leader": model.leader,
            "assignment": [{"device": d, "heads": a.describe_heads(d),
                            "kv_heads": ", ".join(str(g + 1) for g in a.kv_heads(d)),
                            "mlp": ", ".join(f"{s}-{e}" for s, e in a.mlp[d]),
                            "weight_bytes": infos[d].weight_bytes, "standby_bytes": infos[d].standby_bytes}
                           for d in a.devices],
            "duplicated_kv": "; ".join(f"KV head {g + 1} on " + ", ".join(f"Device-{d}" for d in ds)
                                       for g, ds in a.duplicated_kv_heads().items())}


def timing_row(t: Timing) -> dict:
    return {"min_s": t.min, "median_s": t.median, "max_s": t.max, "seconds": list(t.seconds)}


def comparison_rows(outcomes: Sequence[StrategyOutcome], shared_phases: dict[str, float]) -> list[dict]:
    """One row per strategy. `interruption_s` is what a user waited in this run with that strategy,
    the sum of `interruption_phases`: detection, re-forming the group and inheriting weights (shared
    by every strategy, measured once), its KV rebuild (median) and the abandoned step redone."""
    baseline = next((o for o in outcomes if o.name == "full-recompute" and o.timing), None)
    rows = []
    for o in outcomes:
        kv = o.kv
        row = {"name": o.name, "keeps": o.keeps, "flops": o.flops, "reuse_rate": o.reuse_rate,
               "kept_bytes": o.kept_bytes,
               "kept_heads_max_abs_diff": kv.kept_max_abs_diff if kv else None,
               "rebuilt_heads_max_rel_error": kv.rebuilt_max_rel_error if kv else None,
               "rebuilt_heads_tolerance": kv.tolerance if kv else None,
               "logits_max_rel_diff": o.logits_max_rel_diff if kv else None,
               "logits_tolerance": o.logits_tolerance if kv else None, "verdict": o.verdict(),
               "tokens_identical": o.tokens_identical, "continuation_ids": o.continuation,
               "near_tie_mismatches": list(o.near_tie_mismatches),
               "lossless": o.lossless, "error": o.error, "speedup": None, "flop_ratio": None,
               "redo_s": o.redo_s if kv else None, "interruption_s": None, "interruption_phases": None,
               "interruption_ratio": None}
        if o.timing:
            row |= timing_row(o.timing)
            if kv:
                row |= interruption(shared_phases, o.timing.median, o.redo_s)
        if baseline and o.timing:
            row["speedup"] = baseline.timing.median / o.timing.median
            row["flop_ratio"] = baseline.flops / o.flops if o.flops else float("inf")
        rows.append(row)
    add_interruption_ratios(rows, "name")
    return rows


def device_level_row(d) -> dict | None:
    if d is None:
        return None
    return {"device": d.device, "all_query_heads": d.all_query_heads, "inherited_query_heads": d.inherited_query_heads,
            "all_kv_heads": d.all_kv_heads, "inherited_kv_heads": d.inherited_kv_heads,
            "rebuild_all_median_s": d.rebuild_all.median, "rebuild_inherited_median_s": d.rebuild_inherited.median,
            "rebuild_all": timing_row(d.rebuild_all), "rebuild_inherited": timing_row(d.rebuild_inherited),
            "speedup": d.speedup}


def describe_text(model, prompt: str, prompt_ids: list[int], before: list[int], reference: list[int], outcomes,
                  fail_after: int) -> dict:
    decode = model.tokenizer.decode
    return {"prompt": prompt, "prompt_ids": prompt_ids, "before_ids": before, "before_text": decode(before),
            "reference_ids": reference, "reference_text": decode(reference),
            "reference_after_ids": reference[fail_after:],
            "after_ids": {o.name: o.continuation for o in outcomes if o.error is None},
            "after_texts": {o.name: decode(before + o.continuation) for o in outcomes if o.error is None}}


def describe_environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "threads": f"{torch.get_num_threads()} intra-op in the main thread, 1 per device",
            "cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_summary(report: Report, path: Path) -> None:
    print(render_interruption(report) + "\n\n" + render_comparison(report))
    print(f"\nreport: {path} (and {json_path(path)})")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        options = parse_args(argv)
        log = (lambda message: None) if options.quiet else (lambda message: print(message, file=sys.stderr))
        with interrupts_at_wait_points():  # Ctrl-C stops the run where the leader waits, never inside a lock
            report = run_scenario(options, log)
            write_report(options.report, report)
    except (UsageError, CheckpointError, LaunchError) as bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    except StepAbandoned:  # a device went silent although no failure was injected there
        print("error: a device missed its heartbeats without an injected failure (the machine is too loaded "
              "for this timeout: raise --heartbeat-timeout); no report written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: stopped every device, no report written", file=sys.stderr)
        return 130
    if options.quiet:
        print_summary(report, options.report)
    else:
        print(render(report))
        print(f"report written to {options.report} and {json_path(options.report)}; "
              f"timeline: {report['files']['timeline']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
