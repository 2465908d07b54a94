"""How fast each failure detector declares a hung (or wedged) device, and whether it ever declares a live one.

For each `--backend` and `--detector` (fixed timeout, phi accrual):
  * hang: `--repeats` fresh clusters; in each, a device hangs in the middle of a decode step (on
    processes a real SIGSTOP) and the leader declares it dead on its silence alone; the detection
    latency (the hang's moment to the declaration) is recorded: min / median / max. With `--fault
    wedge` the device's compute blocks instead while its beats go on, and it must be declared on
    its lack of progress (`no-progress`; results in detection-wedge.md);
  * load: one cluster prefills a `--load-context`-token context over and over while two extra
    processes keep both cores busy, for `--load-windows` heartbeat intervals; every declaration
    then is a false alarm (nobody failed), and is counted.

Heartbeats are the seed's (every 1 s, fixed timeout 5 s) unless given. The target of issue 12: a
hang declared in at most half the fixed timeout with phi accrual, and no false alarm under load.

The table is printed and written to docs/results/detection.md (`--results`).

    python bench/bench_detection.py                       # the synthetic 1B, 5 hangs each, 20 windows
    python bench/bench_detection.py --model-dir /tmp/tiny --repeats 3 --load-windows 10
    python bench/bench_detection.py --quick               # smoke run (see --help), writes no results file
    python bench/bench_detection.py --fault wedge         # a wedged compute thread instead of a hang
"""
from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from common import Parser, check_model_dir, heartbeat_configs, log, machine, model_folder, parse_with_quick
from demo_options import DEFAULT_PROMPT
from device_protocol import RecoveryPolicy
from fault_injection import FailurePlan
from heartbeat_detection import DETECTORS, HeartbeatConfig
from results import add_results_options, resolve_results, save_results, script_argv

if TYPE_CHECKING:
    from fault_tolerant_cluster import FaultTolerantLlama

TITLES = {"hang": "Detecting a hung device: latency, and false alarms under load",
          "wedge": "Detecting a wedged device (compute stuck, beats on): latency, and false alarms under load"}
DECLARED_BY = {"hang": "heartbeat", "wedge": "no-progress"}  # the only signal each fault gives
QUICK = {"backend": ["threads"], "repeats": 1, "load_windows": 2, "load_context": 32, "heartbeat_interval": 0.1,
         "heartbeat_timeout": 0.5}


def new_cluster(folder: Path, devices: int, heartbeat: HeartbeatConfig, backend: str) -> FaultTolerantLlama:
    from fault_tolerant_cluster import FaultTolerantLlama
    return FaultTolerantLlama.load(folder, devices=devices, log=lambda message: None, heartbeat=heartbeat,
                                   policy=RecoveryPolicy(hold=True), backend=backend)


def detection_s(folder: Path, devices: int, heartbeat: HeartbeatConfig, backend: str, fault: str) -> float:
    """A device hangs (or wedges) mid-step; seconds from the fault to its declaration, which must be
    on the one signal the fault gives."""
    from cluster_leader import StepFailed
    from demo_scenario import build_prompt
    with new_cluster(folder, devices, heartbeat, backend) as model:
        token = int(model.prefill(build_prompt(model.tokenizer, DEFAULT_PROMPT, 32)).argmax())
        model.arm(FailurePlan(devices - 1, after_tokens=1, mode=fault))
        try:
            model.decode(token)
        except StepFailed as failure:
            (event,) = failure.events
            model.release_hung()
            if event.detection.signal != DECLARED_BY[fault]:
                raise RuntimeError(f"the {fault} was declared by {event.detection.signal}, not {DECLARED_BY[fault]}")
            return model.detection_latency_s(event)
    raise RuntimeError(f"the {fault} device was never declared dead")


def false_alarms_under_load(folder: Path, devices: int, heartbeat: HeartbeatConfig, backend: str, windows: int,
                            context: int) -> tuple[int, int]:
    """(declarations, prefills) while the devices prefill `context` tokens again and again and two
    extra processes burn both cores for `windows` heartbeat intervals."""
    from demo_scenario import build_prompt
    from fault_tolerant_cluster import prefill_under_load
    with new_cluster(folder, devices, heartbeat, backend) as model:
        ids = build_prompt(model.tokenizer, DEFAULT_PROMPT, context)[:context]
        return prefill_under_load(model, ids, windows * heartbeat.interval_s)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model-dir", help="checkpoint folder (default: the synthetic Llama-3.2-1B, $KV_REUSE_CACHE)")
    add("--devices", type=int, default=4, help="devices per cluster (default 4)")
    add("--backend", nargs="+", choices=("threads", "processes"), default=["threads", "processes"])
    add("--detector", nargs="+", choices=DETECTORS, default=list(DETECTORS))
    add("--fault", choices=tuple(TITLES), default="hang",
        help="hang (the device stops, beats included; the default) or wedge (its compute blocks, its beats go on)")
    add("--repeats", type=int, default=5, help="faults per backend and detector (default 5)")
    add("--load-windows", type=int, default=20, help="heartbeat intervals of the load test (default 20)")
    add("--load-context", type=int, default=2048, help="tokens of the prefill repeated under load (default 2048)")
    add("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats (default 1)")
    add("--heartbeat-timeout", type=float, default=5.0, help="the fixed detector's timeout (default 5)")
    add("--phi-threshold", type=float, default=8.0, help="phi accrual's threshold (default 8)")
    add("--quick", action="store_true", help="smoke run: threads only, 1 hang each, 2 load windows of 32-token "
                                             "prefills, heartbeats every 0.1 s (timeout 0.5 s); options given still "
                                             "apply")
    add_results_options(parser, "detection")
    args = parse_with_quick(parser, argv, QUICK)
    if args.repeats < 1 or args.load_windows < 0 or args.devices < 2 or args.load_context < 2:
        parser.error("--repeats must be >= 1, --load-windows >= 0, --devices >= 2, --load-context >= 2")
    args.heartbeats = heartbeat_configs(parser, args)
    if args.fault == "wedge":
        args.results_default = "detection-wedge"  # beside the hangs' file, not over it
    config = check_model_dir(parser, args.model_dir)
    if config is not None and args.devices > config.num_attention_heads:
        parser.error(f"--devices {args.devices} is more than the model's {config.num_attention_heads} query heads")
    resolve_results(args, parser)
    return args


def measure(folder: Path, args: argparse.Namespace) -> list[tuple[str, str, list[float], int, int]]:
    """(backend, detector, fault latencies, false declarations, prefills under load) for each pair."""
    rows = []
    for backend, detector in itertools.product(args.backend, args.detector):
        heartbeat = args.heartbeats[detector]
        latencies = []
        for repeat in range(args.repeats):
            latencies.append(detection_s(folder, args.devices, heartbeat, backend, args.fault))
            gc.collect()  # a cluster's memory goes before the next is loaded (device actors hold cycles)
            log(f"{backend}, {detector}: {args.fault} {repeat + 1} declared after {latencies[-1]:.3f} s")
        alarms, prefills = (false_alarms_under_load(folder, args.devices, heartbeat, backend, args.load_windows,
                                                    args.load_context) if args.load_windows else (0, 0))
        gc.collect()
        log(f"{backend}, {detector}: {alarms} false declarations in {args.load_windows} windows ({prefills} prefills)")
        rows.append((backend, detector, latencies, alarms, prefills))
    return rows


def table(folder: Path, args: argparse.Namespace, rows: Sequence[tuple[str, str, list[float], int, int]],
          seconds: float) -> str:
    lines = [f"Checkpoint `{folder}`; {args.devices} devices; heartbeats every {args.heartbeat_interval} s; fixed "
             f"timeout {args.heartbeat_timeout} s; phi threshold {args.phi_threshold}; {args.repeats} {args.fault}s "
             f"each (declared by {DECLARED_BY[args.fault]}); "
             f"load: {args.load_context}-token prefills again and again plus two processes burning the cores for "
             f"{args.load_windows} intervals; {machine()}; total {seconds:.0f} s.\n",
             f"| backend | detector | {args.fault} declared after: min s | median s | max s | / fixed timeout (median) | "
             "false declarations under load | prefills under load |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for backend, detector, latencies, alarms, prefills in rows:
        median = statistics.median(latencies)
        lines.append(f"| {backend} | {detector} | {min(latencies):.3f} | {median:.3f} | {max(latencies):.3f} | "
                     f"{median / args.heartbeat_timeout:.2f} | {alarms} in {args.load_windows} windows | {prefills} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    folder = model_folder(args.model_dir)
    started = time.perf_counter()
    rows = measure(folder, args)
    seconds = time.perf_counter() - started
    body = table(folder, args, rows, seconds)
    print(f"## {TITLES[args.fault]}\n\n{body}")
    save_results(args, TITLES[args.fault], body, script_argv(__file__, argv), seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
