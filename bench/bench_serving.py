"""Serving under failure, as `vllm bench serve` measures serving: one workload (the same requests,
arrival times and failure point) run failure-free, then once per recovery strategy, and once with
`abort`, the baseline of serving engines today (the requests in flight at the failure fail, the
survivors serve the rest); then the cost of insurance at load.

For each run: vLLM's metrics under vLLM's field names (completed and failed requests, throughputs,
TTFT, TPOT, ITL, E2EL, goodput), the outputs that differ from the failure-free run's (each at its
first divergent token a near-tie or a defect), and for the failure: the whole interruption by phase,
the longest stall a request saw, the requests in flight at the failure and their tokens, and the
time until the output rate is back. Every number is measured in the run that prints it.

    python bench/bench_serving.py                                 # SmolLM2-135M-Instruct, ShareGPT
    python bench/bench_serving.py --strategies replicate abort --save-result --result-filename /tmp/s.json
    python bench/bench_serving.py --dataset-name random --random-input-len 64 --random-output-len 16

docs/serving.md says what each flag and field means and how it matches vLLM's.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from common import Parser, check_model_dir, log, torch_dtype
from heartbeat_detection import DETECTORS, HeartbeatConfig
from interruption_phases import PHASES
from results import (add_results_options, provenance, resolve_results, save_results, script_argv, write_json)
from serving_args import MetricOptions, add_serving_args, check_serving_args
from serving_driver import FailurePoint, ServedRun
from serving_metrics import percentile_key

if TYPE_CHECKING:
    from serving_dataset import Workload

TITLE = "Serving under failure: one workload, every recovery strategy, and abort"
RECOVERY_STRATEGIES = ("full-recompute", "reuse-replay", "reuse-hidden", "replicate")  # device_protocol's
ABORT = "abort"  # cluster_leader.ABORT
FAILURE_FREE = "none"
DEFAULTS = {"dataset_name": "sharegpt", "num_prompts": 24, "sharegpt_max_output_len": 128, "request_rate": 0.4}
BIN_S = 1.0  # the throughput picture's bins
INSURANCE_PROMPT_TOKENS = 128  # the insurance's decode steps run on the workload's prompts cut to this


# --------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="bench_serving.py", description=__doc__.split("\n\n")[0])
    add_serving_args(parser)
    parser.set_defaults(**DEFAULTS)
    add_engine_args(parser.add_argument_group("the engine (this tool's)"))
    add_failure_args(parser.add_argument_group("the failure (this tool's)"))
    add_insurance_args(parser.add_argument_group("the cost of insurance (this tool's)"))
    add_result_args(parser.add_argument_group("results (vLLM's --save-result, and docs/results/)"))
    return parser


def add_engine_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--model-dir", help="checkpoint folder (default: SmolLM2-135M-Instruct, converted on first use)")
    group.add_argument("--devices", type=int, default=3, help="simulated devices (default: %(default)s)")
    group.add_argument("--backend", choices=("threads", "processes"), default="threads",
                       help="how the simulated devices run (not vLLM's serving backend: there is no server): "
                            "threads of this process, or one OS process each (docs/backends.md) (default: %(default)s)")
    group.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    group.add_argument("--max-num-seqs", type=int, default=32, help="running requests at most (vLLM's) (default: %(default)s)")
    group.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step at most (vLLM's) (default: %(default)s)")
    group.add_argument("--kv-cache-memory-bytes", type=int, default=512 * 2**20,
                       help="each device's KV budget (vLLM's), what is kept for recovery included (default: %(default)s)")


def add_failure_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--fail-device", type=int, default=1, help="the device that crashes in every failure run (default: %(default)s)")
    when = group.add_mutually_exclusive_group()
    when.add_argument("--fail-after-tokens", type=int,
                      help="output tokens served before the failure, so that every strategy is hit at the same "
                           "point of the work (default: a third of the workload's output tokens)")
    when.add_argument("--fail-at-s", type=float, help="seconds from the start to the failure, instead")
    group.add_argument("--strategies", nargs="+", choices=(*RECOVERY_STRATEGIES, ABORT),
                       default=[*RECOVERY_STRATEGIES, ABORT], help="the failure runs, after the failure-free one (default: %(default)s)")
    group.add_argument("--standby-weights", action="store_true",
                       help="run each recovery strategy again with standby weights (the slices it would inherit "
                            "read before the failure)")
    group.add_argument("--detector", choices=DETECTORS, default="timeout", help="how silence is judged (default: %(default)s)")
    group.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats (default: %(default)s)")
    group.add_argument("--heartbeat-timeout", type=float, default=5.0, help="silence before a device is declared dead (default: %(default)s)")
    group.add_argument("--phi-threshold", type=float, default=8.0, help="with --detector phi (default: %(default)s)")
    group.add_argument("--request-timeout-s", type=float,
                       help="a client that gives up: a request not done this long after it was sent is cancelled "
                            "and counts as failed (default: none gives up)")


def add_insurance_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--insurance-batches", type=int, nargs="*", default=[1, 8, 32],
                       help="batch sizes of the decode-step comparison (none: skip it) (default: %(default)s)")
    group.add_argument("--insurance-steps", type=int, default=6, help="timed decode steps per batch and kind (default: %(default)s)")


def add_result_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--save-result", action="store_true", help="write the JSON (and the pictures beside it)")
    group.add_argument("--result-dir", type=Path, default=Path("."), help="where --save-result writes (default: %(default)s)")
    group.add_argument("--result-filename", help="the JSON's name (default: serving-<rate>qps-<model>-<time>.json)")
    add_results_options(group, "serving")


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, MetricOptions]:
    """The arguments, every mistake refused in one line before torch is imported."""
    parser = build_parser()
    args = parser.parse_args(argv)
    metrics = check_serving_args(parser, args)
    check_model_dir(parser, args.model_dir)
    resolve_results(args, parser)
    for flag in ("devices", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_bytes", "insurance_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.devices < 2:
        parser.error(f"--devices {args.devices}: at least 2 (one to fail, one to survive)")
    if not 0 <= args.fail_device < args.devices:
        parser.error(f"--fail-device {args.fail_device}: devices are 0..{args.devices - 1}")
    for flag in ("fail_after_tokens", "fail_at_s", "request_timeout_s"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            parser.error(f"--{flag.replace('_', '-')} {value}: must be positive")
    if any(b < 1 for b in args.insurance_batches):
        parser.error(f"--insurance-batches {args.insurance_batches}: each at least 1")
    try:
        args.heartbeat = HeartbeatConfig(args.heartbeat_interval, args.heartbeat_timeout, args.detector,
                                         args.phi_threshold)
    except ValueError as bad:
        parser.error(str(bad))
    return args, metrics


# --------------------------------------------------------------------------------------------
# The workload and the runs


def model_folder(model_dir: str | None) -> Path:
    if model_dir:
        return Path(model_dir)
    from smollm2_checkpoint import ensure_smollm2_checkpoint
    return ensure_smollm2_checkpoint(log=log)


def sample_workload(args: argparse.Namespace, folder: Path) -> Workload:
    from llama_config import LlamaConfig
    from llama_model_loader import load_tokenizer
    from serving_dataset import load_chat_template, sample_random, sample_sharegpt

    config = LlamaConfig.from_json(folder / "config.json")
    if args.dataset_name == "random":
        return sample_random(config.vocab_size, args.num_prompts, args.random_input_len, args.random_output_len,
                             args.random_range_ratio, args.seed)
    template = None if args.skip_chat_template else load_chat_template(folder)
    return sample_sharegpt(load_tokenizer(folder, config), args.num_prompts, args.seed, args.dataset_path, template,
                           args.sharegpt_max_input_len, args.sharegpt_max_output_len)


def failure_point(args: argparse.Namespace, workload: Workload) -> FailurePoint:
    if args.fail_at_s is not None:
        return FailurePoint(args.fail_device, at_s=args.fail_at_s)
    total = sum(r.output_len for r in workload.requests)
    return FailurePoint(args.fail_device, after_tokens=args.fail_after_tokens or max(1, total // 3))


def serve_once(args: argparse.Namespace, folder: Path, workload: Workload, arrivals: list[float], strategy: str,
               standby: bool, failure: FailurePoint | None) -> tuple[ServedRun, dict[str, Any]]:
    """One run on a fresh cluster (a crash removes a device): (what the client saw, the failure's accounting)."""
    from device_protocol import RecoveryPolicy
    from fault_tolerant_cluster import FaultTolerantLlama
    from request_scheduler import SchedulerConfig
    from serving_driver import serve
    from serving_insurance import KEPT, STRATEGY_KEEPS

    policy = RecoveryPolicy(strategy=strategy if strategy != FAILURE_FREE else "full-recompute",
                            standby_weights=standby)
    scheduling = SchedulerConfig(args.kv_cache_memory_bytes, max_num_seqs=args.max_num_seqs,
                                 max_num_batched_tokens=args.max_num_batched_tokens)
    with FaultTolerantLlama.load(folder, devices=args.devices, dtype=torch_dtype(args.dtype), log=lambda m: None,
                                 heartbeat=args.heartbeat, policy=policy, backend=args.backend,
                                 scheduling=scheduling) as model:
        model.keep(*KEPT[STRATEGY_KEEPS.get(strategy, "nothing kept")])
        model.generate_batch([workload.requests[0].prompt_ids[:8]], 2)  # warm-up, outside the clock
        run = serve(model, workload.requests, arrivals, args.max_concurrency, args.request_timeout_s,
                    failure)
        return run, failure_accounting(model, run)


def failure_accounting(model: Any, run: ServedRun) -> dict[str, Any]:
    """The whole interruption by phase (interruption_phases.interruption: detection from the fault to its
    declaration, then the leader's Recovery: regroup, weights, rebuild; redo: until the step that
    carried the recovery reached the client), the recovery the leader ran, and what was in flight."""
    from interruption_phases import interruption

    if run.failure_s is None or not run.recoveries:
        return {"interruption_s": None, "interruption_phases": None, "recovery": None,
                **in_flight_at(run, run.failure_s)}
    recovery = run.recoveries[0]
    event = recovery.events[0]
    declared = event.detection.declared_at
    shared = {"detection_s": declared - model.failed_at(event), "regroup_s": recovery.regroup_s,
              "weights_s": recovery.weight_load_s}
    redo = run.clock_origin + run.recovered_s - declared - recovery.regroup_s - recovery.weight_load_s \
        - recovery.rebuild_s
    return {**interruption(shared, [recovery.rebuild_s], redo), **in_flight_at(run, run.failure_s),
            "recovery": {"strategy": recovery.strategy, "fallback_reason": recovery.fallback_reason,
                         "positions_rebuilt": recovery.context_tokens, "attempts": recovery.attempts,
                         "declared_by": event.detection.signal}}


def in_flight_at(run: ServedRun, at_s: float | None) -> dict[str, int | None]:
    """The requests sent and not ended at `at_s`, and their tokens then (prompt and output: the KV at risk)."""
    if at_s is None:
        return {"in_flight_at_failure": None, "in_flight_tokens_at_failure": None}
    open_then = [r for r in run.requests if r.sent_s is not None and r.sent_s <= at_s
                 and (r.finished_s is None or r.finished_s > at_s)]
    tokens = sum(r.sample.prompt_len + sum(1 for t in r.token_times_s if t <= at_s) for r in open_then)
    return {"in_flight_at_failure": len(open_then), "in_flight_tokens_at_failure": tokens}


def compare_outputs(run: ServedRun, baseline: ServedRun, tolerance: float) -> dict[str, Any]:
    """Completed requests whose output differs from the failure-free run's, each judged at its first
    divergent token (lossless_checks.first_divergence): a near-tie, or a defect."""
    from lossless_checks import first_divergence
    differing, near_ties, defects = 0, 0, []
    for index, (got, want) in enumerate(zip(run.requests, baseline.requests)):
        if got.error is not None or want.error is not None:
            continue
        divergence = first_divergence(got.tokens, want.tokens, want.margins, want.logit_scales, tolerance)
        if divergence is None:
            continue
        differing += 1
        if divergence.near_tie:
            near_ties += 1
        else:
            defects.append({"request": index, "first_divergent_token": divergence.token,
                            "margin": divergence.margin, "bound": divergence.bound})
    return {"outputs_differing": differing, "near_ties": near_ties, "defects": defects}


def run_result(strategy: str, standby: bool, run: ServedRun, accounting: dict[str, Any], baseline: ServedRun,
               metrics: MetricOptions, tolerance: float) -> dict[str, Any]:
    """One object of runs[]: vLLM's fields, then the tool's."""
    from serving_metrics import serving_metrics

    fields = serving_metrics(run.records, metrics.percentiles, metrics.percentile_metrics, metrics.goodput,
                             run.failure_s)
    return {"strategy": strategy, "standby_weights": standby, **fields,
            **compare_outputs(run, baseline, tolerance), **accounting, "steps": run.steps,
            "arrivals_s": [r.arrival_s for r in run.requests],
            "ttfts": [r.token_times_s[0] - r.sent_s if r.error is None else None for r in run.requests],
            "output_tokens_per_s": tokens_per_bin(run)}


def tokens_per_bin(run: ServedRun) -> list[float]:
    """Output tokens that reached clients (failed requests' included) per BIN_S, from 0."""
    times = [t for r in run.requests for t in r.token_times_s]
    counts = [0] * (int(max(times, default=0.0) // BIN_S) + 1)
    for t in times:
        counts[int(t // BIN_S)] += 1
    return [c / BIN_S for c in counts]


def run_plan(args: argparse.Namespace) -> list[tuple[str, bool]]:
    """(strategy, standby weights) of every failure run, in order."""
    plan = []
    for strategy in args.strategies:
        plan.append((strategy, False))
        if args.standby_weights and strategy != ABORT:
            plan.append((strategy, True))
    return plan


def measure(args: argparse.Namespace, metrics: MetricOptions) -> dict[str, Any]:
    """Every run of the workload, then the cost of insurance: the JSON result."""
    from lossless_checks import LOGITS_TOLERANCE
    from serving_workload import arrival_times

    folder = model_folder(args.model_dir)
    workload = sample_workload(args, folder)
    arrivals = arrival_times(len(workload.requests), args.request_rate, args.burstiness, args.seed)
    failure = failure_point(args, workload)
    tolerance = LOGITS_TOLERANCE[torch_dtype(args.dtype)]
    log(f"{len(workload.requests)} requests, {sum(r.output_len for r in workload.requests)} output tokens; "
        f"failure-free run")
    baseline, accounting = serve_once(args, folder, workload, arrivals, FAILURE_FREE, False, None)
    runs = [run_result(FAILURE_FREE, False, baseline, accounting, baseline, metrics, tolerance)]
    for strategy, standby in run_plan(args):
        log(f"{strategy}{' with standby weights' if standby else ''}: Device-{args.fail_device} fails")
        run, accounting = serve_once(args, folder, workload, arrivals, strategy, standby, failure)
        runs.append(run_result(strategy, standby, run, accounting, baseline, metrics, tolerance))
    insurance = measure_insurance(args, folder, workload, runs) if args.insurance_batches else None
    return {"date": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"), "backend": args.backend,
            "model_id": folder.name, "devices": args.devices, "num_prompts": len(workload.requests),
            "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
            "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
            "failure": {"device": failure.device, "after_tokens": failure.after_tokens, "at_s": failure.at_s},
            "near_tie_tolerance": tolerance, "workload": workload.as_json(), "runs": runs, "insurance": insurance}


def measure_insurance(args: argparse.Namespace, folder: Path, workload: Workload, runs: list[dict]) -> dict[str, Any]:
    from fault_tolerant_cluster import FaultTolerantLlama
    from request_scheduler import SchedulerConfig
    from serving_insurance import break_even, insurance_rows, measure_steps, requests_held

    log(f"the cost of insurance at batch {', '.join(map(str, args.insurance_batches))}")
    batch = max(args.insurance_batches)
    scheduling = SchedulerConfig(args.kv_cache_memory_bytes, max_num_seqs=batch,
                                 max_num_batched_tokens=max(args.max_num_batched_tokens, batch))
    prompts = [r.prompt_ids[:INSURANCE_PROMPT_TOKENS] for r in workload.requests]
    with FaultTolerantLlama.load(folder, devices=args.devices, dtype=torch_dtype(args.dtype), log=lambda m: None,
                                 heartbeat=args.heartbeat, backend=args.backend, scheduling=scheduling) as model:
        seconds = measure_steps(model, prompts, args.insurance_batches, args.insurance_steps,
                                scheduling.max_num_batched_tokens)
        mean_tokens = sum(r.prompt_len + r.output_len for r in workload.requests) / len(workload.requests)
        held = requests_held(model, args.kv_cache_memory_bytes, scheduling.block_size, mean_tokens)
    rows = insurance_rows(seconds, held)
    return {"batches": args.insurance_batches, "steps": args.insurance_steps, "mean_request_tokens": mean_tokens,
            "rows": rows, "break_even": break_even(rows, runs)}


# --------------------------------------------------------------------------------------------
# Tables


def cell(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def serving_table(result: dict[str, Any], metrics: MetricOptions) -> str:
    """One row per run: vLLM's numbers, then the failure's."""
    stats = [(m, key) for m in metrics.percentile_metrics
             for key in (f"mean_{m}_ms", f"median_{m}_ms", *(percentile_key(m, p) for p in metrics.percentiles))]
    head = ["run", "completed", "failed", "differing (near-ties)", "duration s", "req/s", "output tok/s",
            *(f"{key.split('_')[0]} {m.upper()} ms" for m, key in stats), *(["goodput req/s"] if metrics.goodput else []),
            "interruption s", *(label for _, label in PHASES), "longest stall ms", "in flight (tokens)",
            "output rate back after s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for run in result["runs"]:
        phases = run["interruption_phases"] or {}
        row = [label(run), run["completed"], run["failed"], f"{run['outputs_differing']} ({run['near_ties']})",
               cell(run["duration"]), cell(run["request_throughput"], 2), cell(run["output_throughput"]),
               *(cell(run[key]) for _, key in stats),
               *([cell(run["request_goodput"], 2)] if metrics.goodput else []),
               cell(run["interruption_s"], 2), *(cell(phases.get(key), 2) for key, _ in PHASES),
               cell(run["longest_stall_ms"], 0), in_flight_cell(run), cell(run["throughput_recovery_s"], 2)]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    first = result["runs"][0]
    counts = ", ".join(f"{m.upper()} on {first[f'{m}_requests']} requests" for m in metrics.percentile_metrics)
    gaps = f" (ITL: {first['itl_gaps']} gaps)" if "itl" in metrics.percentile_metrics else ""
    return "\n".join(lines) + (f"\n\nIn the failure-free run the statistics stand on: {counts}{gaps}; in a failure "
                               f"run on its completed requests. near-ties: first divergent token's failure-free "
                               f"top-2 margin at most {2 * result['near_tie_tolerance']:.3g} x its largest |logit|.")


def label(run: dict[str, Any]) -> str:
    return run["strategy"] + (" + standby" if run["standby_weights"] else "")


def in_flight_cell(run: dict[str, Any]) -> str:
    if run["in_flight_at_failure"] is None:
        return "-"
    return f"{run['in_flight_at_failure']} ({run['in_flight_tokens_at_failure']})"


def insurance_table(insurance: dict[str, Any]) -> str:
    """The step time, throughput and requests held by what is kept; then where each strategy's
    insurance pays ("does not fit": the KV budget cannot hold that batch with what it keeps)."""
    from serving_insurance import STRATEGY_KEEPS

    batches = insurance["batches"]
    fits = {row["kept"]: {b: row["decode_step_ms"][b] is not None for b in batches} for row in insurance["rows"]}

    def fitting(value: Any, fit: bool, digits: int = 1) -> str:
        return cell(value, digits) if fit else "does not fit"

    head = ["kept", *(f"step ms @{b}" for b in batches), *(f"output tok/s @{b}" for b in batches),
            f"requests held ({insurance['mean_request_tokens']:.0f} tokens each)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in insurance["rows"]:
        fit = fits[row["kept"]]
        lines.append("| " + " | ".join([row["kept"], *(fitting(row["decode_step_ms"][b], fit[b]) for b in batches),
                                        *(fitting(row["output_throughput"][b], fit[b]) for b in batches),
                                        str(row["requests_held"])]) + " |")
    lines += ["", "| strategy | interruption saved s | " + " | ".join(f"pays above failures/h @{b}" for b in batches)
              + " |", "|---|---:|" + "---:|" * len(batches)]
    for row in insurance["break_even"]:
        rates, fit = row["break_even_failures_per_hour"], fits[STRATEGY_KEEPS[row["strategy"]]]
        lines.append(f"| {label(row)} | {row['saved_s']:.2f} | " + " | ".join(
            "does not fit" if not fit[b] else "never" if rates[b] is None else cell(rates[b], 2) for b in batches) + " |")
    return "\n".join(lines)


def render(result: dict[str, Any], metrics: MetricOptions) -> str:
    text = f"### {TITLE}\n\n{serving_table(result, metrics)}"
    if result["insurance"]:
        text += (f"\n\n### The cost of insurance at load (decode steps, median of {result['insurance']['steps']})"
                 f"\n\n{insurance_table(result['insurance'])}")
    return text


# --------------------------------------------------------------------------------------------


def json_destination(args: argparse.Namespace, result: dict[str, Any]) -> Path | None:
    """--save-result's file (vLLM's), else beside the results file, else none."""
    if args.save_result:
        name = args.result_filename or f"serving-{result['request_rate']}qps-{result['model_id']}-{result['date']}.json"
        return args.result_dir / name
    if args.results != "none":
        return args.results_dir / f"{args.results}.json"
    return None


def write_outputs(args: argparse.Namespace, result: dict[str, Any], body: str, argv: list[str], seconds: float) -> None:
    from serving_plots import picture_paths, plot_requests, plot_throughput

    path = json_destination(args, result)
    if path is not None:
        origin = provenance(argv, seconds)
        write_json(path, {**result, "provenance": origin.as_dict()})
        throughput, requests = picture_paths(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_throughput(result["runs"], throughput, origin.caption())
        plot_requests(result["runs"], requests, origin.caption())
        print(f"\nresult: {path} (pictures: {throughput.name}, {requests.name})")
        body += "".join(f"\n\n![{p.name}]({os.path.relpath(p, args.results_dir)})" for p in (throughput, requests))
    save_results(args, TITLE, body, argv, seconds)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args, metrics = parse_args(argv)
    result = measure(args, metrics)
    body = render(result, metrics)
    print(body)
    write_outputs(args, result, body, script_argv(__file__, argv), time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
