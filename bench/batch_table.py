"""bench_engine.py's batch section: decode throughput of many requests in flight, the engine against
transformers on a padded batch, each side in a process of its own (batch_runners.py), alternating;
the issue's targets (issue 21) checked against what was measured; and batch invariance counted.

Each side runs alone because in one process the reference runs up to 1.8x slower beside a loaded
engine, which would flatter the engine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common import gemv_bandwidth, log, matmul_peak, parameter_count, torch_dtype

RUNNERS = Path(__file__).resolve().parent / "batch_runners.py"
TARGET_BATCH = 32        # the batch for the throughput targets
TARGET_OWN_SCALING = 8   # at TARGET_BATCH: at least 8x the engine's own batch-1 tokens/s
TARGET_PREFILL = 0.9     # a packed prefill: at least 90% of one sequence's token rate at the same total length


@dataclass
class BatchSides:
    """One batch size's samples, one per repeat and side (the JSON batch_runners.py prints)."""
    batch: int
    engine: list[dict] = field(default_factory=list)
    reference: list[dict] = field(default_factory=list)

    def median(self, side: str, key: str) -> float:
        return statistics.median(sample[key] for sample in getattr(self, side))


def run_side(side: str, folder: Path, args: argparse.Namespace, batch: int, dtype_name: str,
             steps: int) -> dict:
    """One side at one batch size in a fresh Python process; its JSON line."""
    command = [sys.executable, str(RUNNERS), side, str(folder), "--batch", str(batch), "--prompt",
               str(args.batch_prompt), "--steps", str(steps), "--dtype", dtype_name, "--seed", str(args.seed),
               "--devices", str(args.devices)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(folder: Path, args: argparse.Namespace, dtype_name: str) -> list[BatchSides]:
    """Every batch size, `--repeats` times each side, the side that goes first alternating."""
    measured = []
    for batch in args.batch_sizes:
        sides = BatchSides(batch)
        for r in range(args.repeats):
            order = ("engine", "reference") if r % 2 == 0 else ("reference", "engine")
            for side in order:
                log(f"batch {batch}: {side}, repeat {r + 1} of {args.repeats}")
                getattr(sides, side).append(run_side(side, folder, args, batch, dtype_name, args.batch_steps))
        measured.append(sides)
    return measured


def targets(sides: BatchSides, own_batch_1: float | None) -> str:
    """The issue's targets that apply at this batch size, each with yes or no."""
    checks = []
    engine = sides.median("engine", "decode_tokens_per_s")
    if sides.batch == TARGET_BATCH:
        scaled = "-" if own_batch_1 is None else ("yes" if engine >= TARGET_OWN_SCALING * own_batch_1 else "no")
        checks.append(f">= {TARGET_OWN_SCALING}x own batch 1: {scaled}")
        checks.append(f">= reference: {'yes' if engine >= sides.median('reference', 'decode_tokens_per_s') else 'no'}")
    if sides.batch > 1:
        checks.append(f"prefill >= {TARGET_PREFILL:.0%}: {'yes' if prefill_share(sides) >= TARGET_PREFILL else 'no'}")
    return "; ".join(checks) or "-"


def prefill_share(sides: BatchSides) -> float:
    """The packed prefill's token rate over one sequence's of the same total length."""
    return (sides.median("engine", "prefill_tokens_per_s")
            / sides.median("engine", "one_sequence_prefill_tokens_per_s"))


@dataclass(frozen=True)
class Floor:
    """What bounds a decode step of a batch from below on this machine: streaming every weight once
    (the measured matrix-vector bandwidth), or the batch's matmuls (2 FLOPs per weight per row, at
    the measured matmul peak), whichever is longer. Attention at these short contexts is left out."""
    weight_bytes: int
    parameters: int
    bytes_per_s: float
    flops_per_s: float

    def step_ms(self, batch: int) -> float:
        return max(self.weight_bytes / self.bytes_per_s, 2 * self.parameters * batch / self.flops_per_s) * 1e3


def measure_floor(folder: Path, args: argparse.Namespace, dtype_name: str) -> Floor:
    """The machine's two yardsticks in the main thread with its default threads (bench_engine's probes)."""
    from llama_model_loader import Checkpoint

    dtype, probes = torch_dtype(dtype_name), args.probes
    parameters = parameter_count(Checkpoint(folder))
    return Floor(parameters * dtype.itemsize, parameters, gemv_bandwidth(dtype, probes.gemv_bytes, probes.gemv_tries),
                 matmul_peak(dtype, probes.matmul_n, probes.matmul_tries))


def throughput_rows(measured: list[BatchSides], floor: Floor) -> list[str]:
    own = {s.batch: s.median("engine", "decode_tokens_per_s") for s in measured}
    lines = ["| batch | floor ms | engine step ms | engine tokens/s | reference step ms | reference tokens/s | "
             "engine / reference | engine vs own batch 1 | packed prefill tokens/s | one sequence tokens/s | "
             "packed / one sequence | targets |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for sides in measured:
        engine, reference = own[sides.batch], sides.median("reference", "decode_tokens_per_s")
        scaling = f"{engine / own[1]:.1f}x" if 1 in own else "-"
        lines.append(f"| {sides.batch} | {floor.step_ms(sides.batch):.1f} | {sides.median('engine', 'decode_step_ms'):.1f} "
                     f"| {engine:.1f} | "
                     f"{sides.median('reference', 'decode_step_ms'):.1f} | {reference:.1f} | {engine / reference:.2f} "
                     f"| {scaling} | {sides.median('engine', 'prefill_tokens_per_s'):.0f} | "
                     f"{sides.median('engine', 'one_sequence_prefill_tokens_per_s'):.0f} | {prefill_share(sides):.0%} "
                     f"| {targets(sides, own.get(1))} |")
    return lines


def invariance_lines(result: dict, args: argparse.Namespace) -> list[str]:
    """The invariance counts, and each first divergence against its near-tie bound."""
    lines = [f"Batch invariance: {result['requests']} requests of up to {args.batch_prompt} prompt tokens (lengths "
             f"spread from about half of it), {args.invariance_tokens} greedy tokens each, served together and then "
             f"each alone on the same engine: {result['tokens']} tokens compared, {result['differing']} requests "
             f"differ, {result['at_near_tie']} of them first at a near-tie (lossless_checks.near_ties: top-2 margin "
             f"within twice the logits bound times the largest |logit|)."]
    lines += [f"- first divergence at token {d['step']}: margin alone {d['alone_margin']:.2e}, in the batch "
              f"{d['batch_margin']:.2e}, near-tie bound {d['bound']:.2e}: {'near-tie' if d['near_tie'] else 'NOT a near-tie'}"
              for d in result["divergences"]]
    return lines


def batch_section(folder: Path, args: argparse.Namespace) -> str:
    """The section's Markdown: the throughput table with its targets, then batch invariance."""
    dtype_name = "bfloat16" if args.dtype == "bfloat16" else "float32"
    floor = measure_floor(folder, args, dtype_name)
    measured = measure(folder, args, dtype_name)
    lines = ["### many requests in flight: decode throughput by batch size\n",
             f"{dtype_name}; engine on {args.devices} device threads; prompts of {args.batch_prompt} tokens, all "
             f"submitted at once and prefilled in one packed step, then {args.batch_steps} decode steps of the whole "
             f"batch, each timed, after 1 untimed; the reference (transformers, padded batch with its attention mask "
             f"and KV cache, same weights) the same. Each side in a process of its own, {args.repeats} repeat(s), "
             f"the side that goes first alternating; medians. One sequence: a prompt as long as the batch's prompts "
             f"together, prefilled alone by the engine. Targets (issue 21): at batch {TARGET_BATCH} the engine gives "
             f"at least {TARGET_OWN_SCALING}x its own batch-1 tokens/s and at least the reference's; a packed prefill "
             f"at least {TARGET_PREFILL:.0%} of one sequence's token rate.\n",
             f"Floor: a step streams every weight once ({floor.weight_bytes / 1e9:.2f} GB at the measured "
             f"matrix-vector bandwidth, {floor.bytes_per_s / 1e9:.1f} GB/s) or does the batch's matmuls (2 FLOPs per "
             f"weight per request at the measured matmul peak, {floor.flops_per_s / 1e9:.0f} GFLOP/s), whichever is "
             f"longer: so a batch of B gives at most B x floor(1) / floor(B) times the batch-1 tokens/s.\n",
             *throughput_rows(measured, floor)]
    if args.invariance_requests:
        log(f"batch invariance: {args.invariance_requests} requests")
        result = run_side("invariance", folder, args, args.invariance_requests, dtype_name, args.invariance_tokens)
        lines += ["", *invariance_lines(result, args)]
    return "\n".join(lines) + "\n"
