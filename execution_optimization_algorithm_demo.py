"""The seed scenario, end to end: what does losing a device cost, and how much does KV reuse save?

Loads Llama-3.2-1B (real if found, else synthetic), splits it by heads over devices, runs a
failure-free reference, then the same generation in which a device crashes mid-step. The leader
detects it, reassigns its heads, the new owners read the weight slices they inherit, and the KV
cache is rebuilt by every recovery strategy from the same post-failure state: timed, counted,
checked lossless. The report goes to /tmp/kv_cache_performance_report.txt (+ .json), with its
pictures beside it (.timeline.png, .phases.png). The scenario itself is demo_scenario.py; this
module is the command line, which answers a mistake before importing torch.

    python execution_optimization_algorithm_demo.py --help
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from demo_options import (DEFAULT_PROMPT, DEFAULT_REPORT, FAULTS, Options, UsageError, check_against_model,
                          check_options)
from device_protocol import DTYPE_NAMES, STRATEGY_NAMES
from heartbeat_detection import DETECTORS
from llama_config import CheckpointError, LlamaConfig, resolve_checkpoint
from recovery_report import Report, render, render_summary
from report_files import json_path, write_report
from task_reassign import STRATEGIES as REASSIGN_STRATEGIES

__all__ = ["DEFAULT_PROMPT", "main", "parse_args"]


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
             "collectives on torch.distributed (gloo), the crash a real SIGKILL (docs/backends.md: two hosts)")
    add("--accelerator", choices=("cpu", "cuda"), default="cpu",
        help="cpu (default), or cuda with --backend processes: every device process computes on a GPU of its "
             "own, collectives on NCCL (docs/backends.md: written for GPUs, not yet run on one)")
    add("--fail-device", type=int, default=1, help="the device that fails (default 1)")
    add("--fail-after", type=int, default=4,
        help="generated tokens before the failure (default 4); with --requests > 1, scheduler steps")
    add("--fault", choices=FAULTS, default="crash",
        help="what the device suffers mid-step: crash (its threads end; processes: SIGKILL; the default), hang "
             "(everything stops, beats included; processes: SIGSTOP), wedge (its compute blocks for good while its "
             "beats go on: found by its lack of progress)"),
    add("--prompt", default=DEFAULT_PROMPT, help="the prompt text")
    add("--context-tokens", type=int, default=512,
        help="pad the prompt (repeating it) to this many tokens, to time recovery at a chosen length (default 512; "
             "0 keeps the prompt as it is)")
    add("--new-tokens", type=int, default=8, help="tokens to generate in all (default 8)")
    add("--reassign", choices=REASSIGN_STRATEGIES, default="random",
        help="who takes the lost heads: random (all to one survivor, seeded) or balanced (spread, KV groups whole)")
    add("--recovery", choices=("all", *STRATEGY_NAMES), default="all", help="strategies to compare (default all)")
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
    add("--dtype", choices=DTYPE_NAMES, default="float32",
        help="compute dtype (default float32: measured faster than bf16 on CPUs without AMX; docs/models.md)")
    add("--repeats", type=int, default=3, help="timed runs of each strategy (default 3)")
    add("--report", type=Path, default=DEFAULT_REPORT,
        help=f"report path (default {DEFAULT_REPORT}); its JSON twin and pictures go beside it, named after it "
             "(.json, .timeline.png, .phases.png)")
    add("--seed", type=int, default=0, help="seed of the random reassignment (default 0)")
    add("--quiet", action="store_true", help="print only the report's path and the comparison table")
    add("--requests", type=int, default=1,
        help="requests served together (default 1: the one sequence); with more, request i joins at step i, "
             "the first is --prompt padded to --context-tokens, the others shorter, with fewer new tokens")
    add("--prompts-file", type=Path, help="with --requests > 1: the other requests' prompts, one per line "
                                          "(default: a built-in set)")
    add("--max-num-batched-tokens", type=int, help="with --requests > 1: tokens per scheduler step (default 2048)")
    add("--max-num-seqs", type=int, help="with --requests > 1: running requests at most (default 256)")
    add("--block-size", type=int, help="with --requests > 1: positions per KV block (default 16)")
    add("--kv-cache-memory-bytes", type=int,
        help="with --requests > 1: each device's KV budget, what is kept for recovery included (default 512 MiB)")
    args = parser.parse_args(argv)
    options = Options(args.model_dir, args.devices, args.fail_device, args.fail_after, args.prompt,
                      args.context_tokens or None, args.new_tokens, args.reassign,
                      STRATEGY_NAMES if args.recovery == "all" else (args.recovery,),
                      args.heartbeat_interval, args.heartbeat_timeout, args.dtype, args.repeats, args.report,
                      args.seed, args.quiet, args.backend, args.detector, args.phi_threshold, args.standby_weights,
                      args.accelerator, args.fault, args.requests, args.prompts_file, args.max_num_batched_tokens,
                      args.max_num_seqs, args.block_size, args.kv_cache_memory_bytes)
    check_options(options)
    return options


def check_config(o: Options) -> None:
    """Refuse, from config.json alone, what this model cannot run (the synthetic fallback is checked
    once it exists)."""
    location = resolve_checkpoint(o.model_dir)
    if location.path is not None:
        check_against_model(o, LlamaConfig.from_json(location.path / "config.json"), 0)


def print_summary(report: Report, path: Path) -> None:
    print(render_summary(report))
    print(f"\nreport: {path} (and {json_path(path)})")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        options = parse_args(argv)
        check_config(options)
    except (UsageError, CheckpointError) as bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    return run(options, ["execution_optimization_algorithm_demo.py", *argv])


def run(options: Options, argv: list[str]) -> int:
    """The run itself, once nothing in the arguments or the config refuses it (torch from here on)."""
    from batch_scenario import run_batch_scenario
    from demo_scenario import explain_abandoned, run_scenario
    from device_network import StepAbandoned
    from device_threads import interrupts_at_wait_points
    from process_launcher import LaunchError

    log = (lambda message: None) if options.quiet else (lambda message: print(message, file=sys.stderr))
    try:
        with interrupts_at_wait_points():  # Ctrl-C stops the run where the leader waits, never inside a lock
            report = (run_batch_scenario if options.requests > 1 else run_scenario)(options, log)
            report["run"]["argv"] = argv
            write_report(options.report, report)
    except (UsageError, CheckpointError, LaunchError) as bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    except StepAbandoned as abandoned:  # a failure that was not injected, or a wait that stalled
        print(f"error: {explain_abandoned(abandoned)}; no report written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: stopped every device, no report written", file=sys.stderr)
        return 130
    if options.quiet:
        print_summary(report, options.report)
    else:
        print(render(report))
        files = report["files"]
        print(f"report written to {options.report} and {json_path(options.report)}; "
              f"pictures: {files['timeline']}, {files['phases']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
