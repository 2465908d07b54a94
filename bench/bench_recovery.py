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
    read, or taken from standby with `--weights standby`) + its rebuild (median) + the redo;
  * many requests in flight (`--batch-requests`, see batch_recovery.py): each strategy's interruption
    against the tokens in flight, the requests the KV budget holds with its kept state, lossless or not.
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

The tables are printed and written to docs/results/recovery.md (`--results`), the pictures to
docs/recovery_vs_context.png and docs/interruption_vs_context.png (`--plot`), each saying what was
run and when.

    KV_REUSE_CACHE=/tmp/kvcache python bench/bench_recovery.py --quick    # writes no results file
    python bench/bench_recovery.py                   # lengths 128 512 2048, 4 and 8 devices, 3 repeats
    python bench/bench_recovery.py --lengths 512 --devices 4 --backend processes --weights standby \
        --reassign random --strategies replicate    # the issue's target: kill to next token
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from batch_recovery import batch_section
from common import (GB, REPO, Parser, check_model_dir, heartbeat_configs, log, machine, memory_status,
                    model_folder, parse_with_quick, torch_dtype)
from device_protocol import DTYPE_NAMES, STRATEGY_NAMES
from heartbeat_detection import DETECTORS
from interruption_phases import PHASES
from results import (Provenance, add_results_options, provenance, resolve_results, save_results, script_argv,
                     write_json)
from task_reassign import STRATEGIES as REASSIGN_STRATEGIES

if TYPE_CHECKING:
    from recovery_trials import Trial

TITLE = "The whole interruption after a device failure, and the KV rebuild, by context length"
DEFAULT_PLOT = REPO / "docs" / "recovery_vs_context.png"
QUICK = {"lengths": [[64, 128]], "devices": [[4]], "repeats": 1, "plot": Path("/tmp/recovery_vs_context_quick.png"),
         "batch_requests": [1, 2, 4], "batch_context": 16, "batch_kv_budget": 0.125}


# --------------------------------------------------------------------------------------------
# Tables


def ratio(value: float | None) -> str:
    """'12.3x', or '-' where there is no ratio (no baseline, or a strategy that does no FLOPs)."""
    return "-" if value is None else f"{value:.1f}x"


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


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model-dir", help="checkpoint folder (default: the synthetic Llama-3.2-1B, $KV_REUSE_CACHE)")
    add("--lengths", type=int_list, nargs="+", default=[[128, 512, 2048]],
        help="context lengths, e.g. 128 512 or 128,512 (default 128 512 2048)")
    add("--devices", type=int_list, nargs="+", default=[[4, 8]], help="device counts (default 4 8)")
    add("--reassign", nargs="+", choices=REASSIGN_STRATEGIES, default=list(REASSIGN_STRATEGIES),
        help="reassignment strategies (default random balanced)")
    add("--strategies", nargs="+", choices=STRATEGY_NAMES, default=list(STRATEGY_NAMES),
        help="recovery strategies (default all)")
    add("--repeats", type=int, default=3, help="timed runs of each strategy per trial (default 3)")
    add("--dtype", choices=DTYPE_NAMES, default="float32", help="compute dtype (default float32)")
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
    add("--plot", type=Path, default=DEFAULT_PLOT,
        help=f"recovery-vs-context PNG (default {DEFAULT_PLOT.relative_to(REPO)}; with --quick {QUICK['plot']}); "
             f"the whole interruption's goes beside it, 'recovery' in its name replaced by 'interruption'")
    add("--json", type=Path, help="also write every measurement as JSON here (strict: no NaN or Infinity)")
    add("--batch-requests", type=int, nargs="*", default=[1, 8, 32],
        help="requests in flight of the batch section (default 1 8 32; with --quick 1 2 4); none given: no such "
             "section")
    add("--batch-context", type=int, default=512,
        help="the longest prompt of that section; the others spread down to half of it (default 512; with --quick 16)")
    add("--batch-new-tokens", type=int, default=4, help="greedy tokens per request of that section (default 4)")
    add("--batch-kv-budget", type=float, default=512.0,
        help="each device's KV budget in that section, MiB (default 512, the engine's; with --quick 0.125)")
    add("--quick", action="store_true", help="smoke run: lengths 64 128, 4 devices, 1 repeat; batch section on 1 2 4 "
        "requests of up to 16 tokens in a 0.125 MiB budget (options given still apply)")
    add_results_options(parser, "recovery")
    args = parse_with_quick(parser, argv, QUICK)
    args.lengths, args.devices = sum(args.lengths, []), sum(args.devices, [])
    if args.repeats < 1 or min(args.lengths) < 2 or min(args.devices) < 2:
        parser.error("--repeats must be >= 1, --lengths >= 2, --devices >= 2")
    if min(args.batch_requests, default=1) < 1 or args.batch_context < 2 or args.batch_new_tokens < 1 \
            or args.batch_kv_budget <= 0:
        parser.error("--batch-requests and --batch-new-tokens must be at least 1, --batch-context at least 2, "
                     "--batch-kv-budget positive")
    if not 0 <= args.fail_device < min(args.devices):
        parser.error(f"--fail-device {args.fail_device} does not exist with {min(args.devices)} devices")
    for option, path in (("--plot", args.plot), ("--json", args.json)):
        if path is not None and path.is_dir():
            parser.error(f"{option} {path} is a folder, not a file")
    args.heartbeats = heartbeat_configs(parser, args)
    config = check_model_dir(parser, args.model_dir)
    if config is not None:
        if max(args.devices) > config.num_attention_heads:
            parser.error(f"--devices {max(args.devices)} is more than the model's {config.num_attention_heads} "
                         f"query heads")
        longest = max(args.lengths + [args.batch_context + args.batch_new_tokens])
        if longest + 1 > config.max_position_embeddings:
            parser.error(f"--lengths or --batch-context + --batch-new-tokens: {longest} tokens exceed the model's "
                         f"{config.max_position_embeddings} positions")
    resolve_results(args, parser)
    return args


def run_trials(folder: Path, args: argparse.Namespace) -> list[Trial]:
    """Every (backend, devices, detector, weights, reassign, context) trial, one fresh cluster each."""
    from recovery_trials import ClusterFactory, run_trial

    dtype = torch_dtype(args.dtype)
    started = time.perf_counter()
    trials: list[Trial] = []
    for backend, devices, detector, weights in itertools.product(args.backend, args.devices, args.detector,
                                                                 args.weights):
        factory = ClusterFactory(folder, devices, dtype, args.heartbeats[detector], backend, weights)
        first = (detector, weights) == (args.detector[0], args.weights[0])
        for r, reassign in enumerate(args.reassign):
            for context in args.lengths:
                log(f"{backend}: {devices} devices, {detector} detector, weights {weights}, {reassign} "
                    f"reassignment, {context}-token context ({time.perf_counter() - started:.0f} s so far)")
                trials.append(run_trial(factory, context, reassign, args, with_overhead=first and r == 0))
                gc.collect()
        del factory
        gc.collect()
    return trials


def tables(folder: Path, args: argparse.Namespace, trials: Sequence[Trial], seconds: float) -> str:
    """Every table of the run, in Markdown."""
    from recovery_trials import copy_bandwidth_text

    return "\n".join([
        "## The whole interruption after a device failure, by context length\n",
        f"Checkpoint `{folder}`; {args.dtype}; Device-{args.fail_device} crashes; {args.repeats} alternating runs "
        f"per strategy per trial; heartbeats every {args.heartbeat_interval} s (timeout {args.heartbeat_timeout} s, "
        f"phi threshold {args.phi_threshold}); {machine()}; copy bandwidth (the checkpoint's dtype to {args.dtype}, "
        f"one thread) {copy_bandwidth_text(folder, torch_dtype(args.dtype))}; "
        f"total {seconds:.0f} s; peak RSS {memory_status()['VmHWM'] / GB:.1f} GB.\n",
        interruption_table(trials),
        "\ndetect: the fault to its declaration; regroup: fencing, the survivors' first call on the new group, "
        "cutting them to the leader's record; weights: the new owners' slices; rebuild: the KV cache (median); redo: "
        "the abandoned step, which gives the next token; full / this: full recompute's whole interruption over this "
        "strategy's.\n",
        "## KV-cache rebuild alone\n",
        recovery_table(trials),
        "\nspeedup = full-recompute median / strategy median (same trial); FLOP ratio likewise from FLOPs "
        "counted from shapes ('-' for a strategy that does none); kept = state the survivors keep during normal "
        "running for the strategy.\n",
        trial_table(trials),
        "\nPer decode step, same position, alternating (median ms; change against nothing kept):\n",
        overhead_table(trials)])


def interruption_plot_path(plot: Path) -> Path:
    """The whole interruption's picture beside the rebuild's: docs/recovery_vs_context.png gives
    docs/interruption_vs_context.png (the names the documentation links)."""
    name = plot.name.replace("recovery", "interruption", 1) if "recovery" in plot.name else f"interruption_{plot.name}"
    return plot.with_name(name)


def draw(args: argparse.Namespace, trials: Sequence[Trial], origin: Provenance) -> tuple[Path, Path]:
    """The rebuild and the whole interruption against context: the first backend, detector and weights
    given (the tables give every one), each captioned with the command, the date and the machine."""
    from recovery_plots import plot_recovery_vs_context

    plotted = args.backend[0]
    rows = [row for trial in trials for row in trial.rows if row.get("median_s") is not None
            and (row["backend"], row["detector"], row["weights"]) == (plotted, args.detector[0], args.weights[0])]
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    caption = origin.caption()
    rebuild = plot_recovery_vs_context(
        rows, args.plot, f"KV rebuild after a device failure ({args.dtype}, {plotted}, median of {args.repeats})",
        caption=caption)
    whole = plot_recovery_vs_context(
        rows, interruption_plot_path(args.plot),
        f"The whole interruption, failure to next token ({args.dtype}, {plotted}, {args.detector[0]} detector, "
        f"weights {args.weights[0]})", measure="interruption_s", ylabel="failure to next token", caption=caption)
    return rebuild, whole


def picture_links(args: argparse.Namespace, pictures: Sequence[Path]) -> str:
    """Markdown images of the pictures, relative to the results folder (they render on GitHub)."""
    return "\n\n".join(f"![{path.stem.replace('_', ' ')}]({os.path.relpath(path.resolve(), args.results_dir.resolve())})"
                        for path in pictures)


def trials_json(trials: Sequence[Trial]) -> list[dict]:
    """Every trial's fields, each overhead timing as its list of seconds."""
    return [{**vars(t), "overhead": {mode: list(timing.seconds) for mode, timing in (t.overhead or {}).items()}}
            for t in trials]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    folder = model_folder(args.model_dir)
    command = script_argv(__file__, argv)
    started = time.perf_counter()
    trials = run_trials(folder, args)
    batch = batch_section(folder, args) if args.batch_requests else ""
    seconds = time.perf_counter() - started
    body = tables(folder, args, trials, seconds) + ("\n\n" + batch if batch else "")
    print(body)
    origin = provenance(command, seconds)
    pictures = draw(args, trials, origin)
    print(f"\nplots: {', '.join(map(str, pictures))}")
    if args.json:
        write_json(args.json, {"provenance": origin.as_dict(), "trials": trials_json(trials)})
        print(f"json: {args.json}")
    save_results(args, TITLE, body + "\n\n" + picture_links(args, pictures), command, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
