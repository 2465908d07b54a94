"""Speed of the tensor-parallel engine against Hugging Face `LlamaForCausalLM`, same weights, same dtype.

What it measures, per dtype (float32, then bfloat16, freeing memory in between):
  * prefill of each `--lengths` tokens (seconds; logits of the last token only, in both models);
  * decode: after a `--decode-after`-token prefill, `--decode-steps` single-token steps, each timed
    on its own; one sample per repeat is the median of its steps (milliseconds per token);
  * this machine's matmul peak: best of 10 torch.mm of 2048 x 2048 in the same dtype, in the main
    thread with torch's default thread count; the prefill FLOPs (counted from shapes, see
    common.prefill_flops) divided by the median time give each model's fraction of that peak;
  * decode's floor: a token streams every weight once, so weight bytes / the measured bandwidth of
    a matrix-vector product (common.gemv_bandwidth) bounds a step from below, for both models;
  * decode again with the engine's device code as one device called in the main thread (both
    cores, no device threads): what the split and the threads cost, apart from the arithmetic;
  * decode step: processes against threads against bare gloo (`--step-models`, in float32 unless
    --dtype bfloat16): `--step-samples` decode steps on each backend, the same device code over the
    processes' collective in plain processes (no actors, leader, driver or messages), and the gloo
    calls such a step makes (recorded from a real step, see step_costs.py) replayed bare; the goal
    is a processes step within the threads step + 1.5 x the bare calls;
  * many requests in flight (`--batch-sizes`, see batch_table.py): decode tokens/s of the engine and
    of transformers on a padded batch, each side in a process of its own, alternating; the packed
    prefill against one sequence of the same total length; the issue's targets; batch invariance.

How: the engine (`--devices` device threads, one intra-op thread each) and the reference
(`LlamaForCausalLM`, sdpa attention, `use_cache=True`, `torch.inference_mode()`, the main thread's
default threads) are both loaded, and every case runs one untimed warm-up each, then `--repeats`
timed runs alternating engine and reference (the first of the pair alternates too). The same token
ids feed both. Before timing, the last-token logits of the two are compared so that the table
cannot compare different models.

How to read it: medians (min in brackets); ratio = reference median / engine median, so >1 means
the engine is faster. On a shared or small machine the numbers are noisy: rerun before quoting.

The tables are printed and written to docs/results/engine.md (`--results`), with the command,
the machine and the commit.

    python bench/bench_engine.py                  # both dtypes, lengths 128 512, 3 repeats
    python bench/bench_engine.py --quick          # smoke run: lengths 32, 1 repeat, writes no results file
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from common import (Parser, check_model_dir, gemv_bandwidth, machine, matmul_peak, min_median,
                    model_folder, parameter_count, parse_with_quick, prefill_flops, torch_dtype)
from device_protocol import DTYPE_NAMES
from results import add_results_options, resolve_results, save_results, script_argv

if TYPE_CHECKING:
    import torch

    from engine_runners import EngineRunner, ReferenceRunner
    from llama_model_loader import Checkpoint
    from step_costs import GlooTimes

TITLE = "Engine speed against transformers' LlamaForCausalLM"
STEP_MODELS = ("tiny", "checkpoint")
GOAL_FACTOR = 1.5  # issue 20: a processes step within the threads step + 1.5 x the bare gloo calls it needs


@dataclass(frozen=True)
class Probes:
    """The sizes of the machine's two yardsticks (a quick run shrinks them: seconds, not tens)."""
    matmul_n: int = 2048
    matmul_tries: int = 10
    gemv_bytes: int = 1 << 30
    gemv_tries: int = 5


QUICK = {"lengths": [32], "repeats": 1, "decode_after": 32, "decode_steps": 4, "step_models": ["checkpoint"],
         "step_samples": 8, "batch_sizes": [1, 4], "batch_prompt": 8, "batch_steps": 3, "invariance_requests": 4,
         "invariance_tokens": 6,
         "probes": Probes(matmul_n=256, matmul_tries=3, gemv_bytes=16 << 20, gemv_tries=3)}


@dataclass
class MachineLimits:
    matmul_flops: float      # FLOP/s of a large matmul (prefill's bound)
    gemv_bytes_per_s: float  # weight bytes/s of a matrix-vector product (decode's bound)


@dataclass
class Row:
    what: str
    unit: str
    engine: list[float]
    reference: list[float]


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def alternate(engine_case: Callable[[], float], reference_case: Callable[[], float],
              repeats: int) -> tuple[list[float], list[float]]:
    """One untimed warm-up each, then `repeats` samples of each, alternating which goes first."""
    engine_case(), reference_case()
    engine, reference = [], []
    for r in range(repeats):
        pair = [(engine_case, engine), (reference_case, reference)]
        for case, samples in (pair if r % 2 == 0 else pair[::-1]):
            samples.append(case())
    return engine, reference


def bench_dtype(folder: Path, dtype_name: str, args: argparse.Namespace, ids: torch.Tensor) -> str:
    """For each backend in turn: its engine against the reference, alternating; then one device.
    Returns the dtype's section of the results (Markdown)."""
    import torch

    from engine_runners import EngineRunner, ReferenceRunner
    from llama_model_loader import Checkpoint

    dtype = torch_dtype(dtype_name)
    probes = args.probes
    limits = MachineLimits(matmul_peak(dtype, probes.matmul_n, probes.matmul_tries),
                           gemv_bandwidth(dtype, probes.gemv_bytes, probes.gemv_tries))
    started = time.perf_counter()
    reference = ReferenceRunner(folder, dtype)
    reference_load = time.perf_counter() - started
    rows: list[Row] = []
    loads, checks = {}, {}
    try:
        for backend in args.backends:
            started = time.perf_counter()
            engine = EngineRunner(folder, args.devices, dtype, backend)
            loads[backend] = time.perf_counter() - started
            try:
                rows += engine_rows(engine, reference, backend, args, ids)
                check = ids[:min(args.lengths)]
                ours, theirs = engine.prefill(check), reference.prefill(check)
                checks[backend] = ((ours - theirs).abs().max().item() / theirs.abs().max().item(),
                                   int(ours.argmax()) == int(theirs.argmax()))
            finally:
                engine.close()  # its weights make room for the next engine's
                gc.collect()
        prompt = ids[:args.decode_after]
        steps = ids[args.decode_after:args.decode_after + args.decode_steps]
        rows.append(single_device_decode(folder, dtype, reference, prompt, steps, args.repeats))
    finally:
        reference.close()
        reference = None  # drop the weights before the next dtype
        gc.collect()
    return dtype_section(dtype_name, args, rows, limits, Checkpoint(folder), loads, reference_load, checks,
                         torch.get_num_threads())


def engine_rows(engine: EngineRunner, reference: ReferenceRunner, backend: str, args: argparse.Namespace,
                ids: torch.Tensor) -> list[Row]:
    rows = []
    for length in args.lengths:
        prompt = ids[:length]
        e, r = alternate(lambda: timed(lambda: engine.prefill(prompt)),
                         lambda: timed(lambda: reference.prefill(prompt)), args.repeats)
        rows.append(Row(f"prefill {length} tokens, {backend}", "s", e, r))
    prompt = ids[:args.decode_after]
    steps = ids[args.decode_after:args.decode_after + args.decode_steps]
    e, r = alternate(lambda: statistics.median(engine.decode_times(prompt, steps)) * 1e3,
                     lambda: statistics.median(reference.decode_times(prompt, steps)) * 1e3, args.repeats)
    rows.append(Row(f"decode after {args.decode_after} tokens ({args.decode_steps} steps), {backend}",
                    "ms/token", e, r))
    return rows


def single_device_decode(folder: Path, dtype: torch.dtype, reference: ReferenceRunner, prompt: torch.Tensor,
                         steps: torch.Tensor, repeats: int) -> Row:
    from engine_runners import OneDeviceInMainThread

    single = OneDeviceInMainThread(folder, dtype)
    try:
        e, r = alternate(lambda: statistics.median(single.decode_times(prompt, steps)) * 1e3,
                         lambda: statistics.median(reference.decode_times(prompt, steps)) * 1e3, repeats)
    finally:
        single.close()
    return Row("decode, the device code as 1 device in the main thread (no device threads)", "ms/token", e, r)


def dtype_section(dtype_name: str, args: argparse.Namespace, rows: list[Row], limits: MachineLimits,
                  checkpoint: Checkpoint, engine_loads: dict[str, float], reference_load: float,
                  checks: dict[str, tuple[float, bool]], main_threads: int) -> str:
    """One dtype's table and what bounds it, in Markdown."""
    stored = {"BF16": "bfloat16", "F32": "float32"}.get(checkpoint.stored_dtype)
    lazy_note = (" (the stored dtype: transformers memory-maps the file and pages weights in during the warm-up)"
                 if stored == dtype_name else "")
    lines = [f"### {dtype_name}\n",
             f"Machine: {machine()}; main thread {main_threads} torch threads (reference, matmul peak); "
             f"engine: {args.devices} devices (threads of this process, or processes) x 1 intra-op thread. "
             f"{args.repeats} repeats after 1 warm-up each, alternating. Load: "
             + ", ".join(f"engine on {b} {s:.1f} s" for b, s in engine_loads.items())
             + f", reference {reference_load:.1f} s{lazy_note}. Last-token logits, engine vs reference: "
             + "; ".join(f"{b} max |diff| / max |ref| = {d:.1e}, same argmax: {same}"
                         for b, (d, same) in checks.items()) + ".\n",
             "| what | engine median (min) | reference median (min) | ratio ref/engine |",
             "|---|---|---|---|"]
    for row in rows:
        (e_min, e_med), (r_min, r_med) = min_median(row.engine), min_median(row.reference)
        fmt = "{:.3f}" if row.unit == "s" else "{:.1f}"
        lines.append(f"| {row.what} ({row.unit}) | {fmt.format(e_med)} ({fmt.format(e_min)}) | "
                     f"{fmt.format(r_med)} ({fmt.format(r_min)}) | {r_med / e_med:.2f} |")
    lines += ["", *bounds_lines(dtype_name, args, rows, limits, checkpoint)]
    return "\n".join(lines) + "\n"


def bounds_lines(dtype_name: str, args: argparse.Namespace, rows: list[Row], limits: MachineLimits,
                 checkpoint: Checkpoint) -> list[str]:
    """Prefill against the matmul peak, decode against the floor of streaming every weight once."""
    probes = args.probes
    longest = max(args.lengths)
    flops = prefill_flops(checkpoint.config, longest)
    peak = limits.matmul_flops
    lines = [f"Matmul peak (torch.mm {probes.matmul_n}x{probes.matmul_n} {dtype_name}, main thread, best of "
             f"{probes.matmul_tries}): {peak / 1e9:.0f} GFLOP/s. Prefill {longest} = {flops / 1e9:.0f} GFLOP "
             f"(counted from shapes)."]
    for row in (r for r in rows if r.what.startswith(f"prefill {longest} tokens")):
        e_rate, r_rate = flops / statistics.median(row.engine), flops / statistics.median(row.reference)
        lines.append(f"- {row.what}: engine {e_rate / 1e9:.0f} GFLOP/s = {e_rate / peak:.0%} of peak, reference "
                     f"beside it {r_rate / 1e9:.0f} GFLOP/s = {r_rate / peak:.0%} of peak.")
    streamed = parameter_count(checkpoint) * torch_dtype(dtype_name).itemsize
    floor_ms = streamed / limits.gemv_bytes_per_s * 1e3
    lines += ["", f"Decode floor: a token streams every weight ({streamed / 1e9:.2f} GB; the tied embedding once, "
                  f"as the LM head); at the measured matrix-vector bandwidth ({limits.gemv_bytes_per_s / 1e9:.1f} "
                  f"GB/s, main thread, {probes.gemv_bytes / 2 ** 20:.0f} MiB weight, best of {probes.gemv_tries}) "
                  f"that is {floor_ms:.0f} ms."]
    for decode in (r for r in rows if r.what.startswith("decode after")):
        e_ms, r_ms = statistics.median(decode.engine), statistics.median(decode.reference)
        lines.append(f"- {decode.what}: engine {e_ms / floor_ms - 1:+.0%}, reference {r_ms / floor_ms - 1:+.0%} "
                     f"above it.")
    return lines


@dataclass
class StepCosts:
    """One model's decode steps, in seconds: on each backend, and in the bare gloo processes."""
    model: str
    threads: list[float]
    processes: list[float]
    gloo: GlooTimes


def step_folders(models: Sequence[str], checkpoint: Path) -> dict[str, Path]:
    """The section's checkpoints by name, each once (the tiny preset is written on first use)."""
    folders = {}
    for model in models:
        folder = model_folder_of(model, checkpoint)
        if folder.resolve() not in {f.resolve() for f in folders.values()}:
            folders[model if model != "checkpoint" else folder.name] = folder
    return folders


def model_folder_of(model: str, checkpoint: Path) -> Path:
    if model == "checkpoint":
        return checkpoint
    from synthetic_checkpoint import ensure_synthetic_checkpoint
    return ensure_synthetic_checkpoint(model, log=lambda m: print(m, file=sys.stderr))


def step_section(folders: dict[str, Path], args: argparse.Namespace) -> str:
    """Each model's decode steps on threads, on processes, and as bare gloo calls (Markdown)."""
    from step_costs import folded

    dtype_name = "bfloat16" if args.dtype == "bfloat16" else "float32"
    costs = [measure_steps(name, folder, dtype_name, args) for name, folder in folders.items()]
    lines = ["### decode step: processes against threads against bare gloo\n",
             f"{dtype_name}, {args.devices} devices, {args.step_samples} decode steps per row after "
             f"{args.decode_after} prompt tokens and 1 untimed step, one backend after the other. Device code on "
             f"gloo: the engine's device code over the processes backend's own collective in {args.devices} plain "
             f"processes (no actors, leader, driver or messages). Bare gloo calls: the calls one such step makes, "
             f"recorded, replayed with plain waits in the same processes. Those two rows: back to back, "
             f"alternating, timed by the process that answers the logits. Goal: processes median at most "
             f"threads median + {GOAL_FACTOR:g} x bare median.\n",
             "| model | backend | median step ms | p10 | p90 | bare gloo calls ms | goal ms | met |",
             "|---|---|---|---|---|---|---|---|"]
    for cost in costs:
        lines += step_rows(cost)
    lines += ["", "Gloo calls per decode step, recorded from the device code:"]
    lines += [f"- {cost.model}: {len(cost.gloo.calls)} calls: {folded(cost.gloo.calls)}" for cost in costs]
    return "\n".join(lines) + "\n"


def measure_steps(name: str, folder: Path, dtype_name: str, args: argparse.Namespace) -> StepCosts:
    """Time one model's steps: threads, then processes, then the bare gloo processes."""
    import torch

    from engine_runners import EngineRunner
    from llama_model_loader import Checkpoint
    from step_costs import time_gloo

    dtype = torch_dtype(dtype_name)
    ids = torch.randint(0, Checkpoint(folder).config.vocab_size, (args.decode_after + args.step_samples + 1,),
                        generator=torch.Generator().manual_seed(args.seed))
    prompt, tokens = ids[:args.decode_after], ids[args.decode_after:]
    backends = {}
    for backend in ("threads", "processes"):
        engine = EngineRunner(folder, args.devices, dtype, backend)
        try:
            backends[backend] = engine.decode_times(prompt, tokens)[1:]
        finally:
            engine.close()
            gc.collect()
    gloo = time_gloo(folder, args.devices, dtype, prompt.tolist(), tokens.tolist())
    return StepCosts(name, backends["threads"], backends["processes"], gloo)


def step_rows(cost: StepCosts) -> list[str]:
    """The model's four rows: threads, processes (against the goal), device code on gloo, bare gloo."""
    bare = statistics.median(cost.gloo.bare)
    goal = statistics.median(cost.threads) + GOAL_FACTOR * bare
    met = "yes" if statistics.median(cost.processes) <= goal else "no"
    return [step_row(cost.model, "threads", cost.threads),
            step_row(cost.model, "processes", cost.processes, [f"{bare * 1e3:.1f}", f"{goal * 1e3:.1f}", met]),
            step_row(cost.model, "device code on gloo", cost.gloo.device_code),
            step_row(cost.model, "bare gloo calls", cost.gloo.bare)]


def step_row(model: str, backend: str, seconds: list[float], against_goal: Sequence[str] = ("", "", "")) -> str:
    p10, *_, p90 = statistics.quantiles(seconds, n=10)
    cells = [model, backend, *(f"{value * 1e3:.1f}" for value in (statistics.median(seconds), p10, p90)),
             *against_goal]
    return "| " + " | ".join(cells) + " |"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="checkpoint folder (default: the synthetic Llama-3.2-1B)")
    parser.add_argument("--dtype", choices=[*DTYPE_NAMES, "both"], default="both")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--backend", choices=["threads", "processes", "both"], default="threads",
                        help="the engine's devices: threads, processes, or both one after the other (default threads)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-after", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-models", nargs="*", choices=STEP_MODELS, default=list(STEP_MODELS),
                        help="models of the section 'decode step: processes against threads against bare gloo': "
                             "tiny (the preset, written on first use), checkpoint (the one benchmarked); none "
                             "given: no such section (default: both; with --quick checkpoint)")
    parser.add_argument("--step-samples", type=int, default=40,
                        help="decode steps timed per backend in that section, after 1 warm-up (default 40; "
                             "with --quick 8)")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8, 32],
                        help="batch sizes of the section 'many requests in flight' (default 1 8 32; with --quick "
                             "1 4); none given: no such section")
    parser.add_argument("--batch-prompt", type=int, default=32,
                        help="prompt tokens of each request in that section (default 32; with --quick 8)")
    parser.add_argument("--batch-steps", type=int, default=8,
                        help="decode steps of the whole batch timed in that section, after 1 untimed (default 8; "
                             "with --quick 3)")
    parser.add_argument("--invariance-requests", type=int, default=8,
                        help="requests served together, then each alone, for batch invariance (default 8; with "
                             "--quick 4; 0: not measured)")
    parser.add_argument("--invariance-tokens", type=int, default=16,
                        help="greedy tokens per request of that measurement (default 16; with --quick 6)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: lengths 32, 1 repeat, 4 decode steps after 32 tokens, small matmul and "
                             "bandwidth probes (options given still apply)")
    add_results_options(parser, "engine")
    parser.set_defaults(probes=Probes())
    args = parse_with_quick(parser, argv, QUICK)
    args.backends = ["threads", "processes"] if args.backend == "both" else [args.backend]
    if args.repeats < 1 or min(args.lengths) < 1 or args.decode_after < 1 or args.decode_steps < 1:
        parser.error("--repeats, --lengths, --decode-after and --decode-steps must be at least 1")
    if args.step_samples < 3:
        parser.error(f"--step-samples must be at least 3 (a p10 and a p90), got {args.step_samples}")
    if args.devices < 1:
        parser.error(f"--devices must be at least 1, got {args.devices}")
    if min(args.batch_sizes, default=1) < 1 or args.batch_prompt < 1 or args.batch_steps < 1 \
            or args.invariance_requests < 0 or args.invariance_tokens < 1:
        parser.error("--batch-sizes, --batch-prompt, --batch-steps and --invariance-tokens must be at least 1, "
                     "--invariance-requests at least 0")
    config = check_model_dir(parser, args.model_dir)
    if config is not None:
        check_against_config(parser, args, config.num_attention_heads, config.max_position_embeddings)
    resolve_results(args, parser)
    return args


def check_against_config(parser: Parser, args: argparse.Namespace, heads: int, positions: int) -> None:
    """What the checkpoint's config.json refuses, before loading it."""
    if args.devices > heads:
        parser.error(f"--devices {args.devices} is more than the model's {heads} query heads")
    if total_tokens(args) > positions:
        parser.error(f"{total_tokens(args)} tokens exceed the model's {positions} positions")
    one_sequence = args.batch_prompt * max(args.batch_sizes, default=0)
    if one_sequence > positions:
        parser.error(f"--batch-prompt x the largest --batch-sizes ({one_sequence} tokens, the packed prefill's "
                     f"one-sequence yardstick) exceed the model's {positions} positions")


def total_tokens(args: argparse.Namespace) -> int:
    return max(max(args.lengths), args.decode_after + args.decode_steps, args.decode_after + args.step_samples + 1)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from llama_model_loader import Checkpoint

    folder = model_folder(args.model_dir)
    config = Checkpoint(folder).config
    ids = torch.randint(0, config.vocab_size, (total_tokens(args),),
                        generator=torch.Generator().manual_seed(args.seed))
    print(f"checkpoint: {folder}")
    started = time.perf_counter()
    sections = []
    for dtype_name in (list(DTYPE_NAMES) if args.dtype == "both" else [args.dtype]):
        sections.append(bench_dtype(folder, dtype_name, args, ids))
        print("\n" + sections[-1], flush=True)
        gc.collect()
    if args.batch_sizes:
        from batch_table import batch_section
        sections.append(batch_section(folder, args))
        print("\n" + sections[-1], flush=True)
    if args.step_models:
        sections.append(step_section(step_folders(args.step_models, folder), args))
        print("\n" + sections[-1], flush=True)
    seconds = time.perf_counter() - started
    print(f"\n(benchmark took {seconds:.0f} s)")
    save_results(args, TITLE, f"Checkpoint `{folder}`.\n\n" + "\n".join(sections),
                 script_argv(__file__, argv), seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
