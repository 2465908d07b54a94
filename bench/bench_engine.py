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
    cores, no device threads): what the split and the threads cost, apart from the arithmetic.

How: the engine (`--devices` device threads, one intra-op thread each) and the reference
(`LlamaForCausalLM`, sdpa attention, `use_cache=True`, `torch.inference_mode()`, the main thread's
default threads) are both loaded, and every case runs one untimed warm-up each, then `--repeats`
timed runs alternating engine and reference (the first of the pair alternates too). The same token
ids feed both. Before timing, the last-token logits of the two are compared so that the table
cannot compare different models.

How to read it: medians (min in brackets); ratio = reference median / engine median, so >1 means
the engine is faster. On a shared or small machine the numbers are noisy: rerun before quoting.

    python bench/bench_engine.py                  # both dtypes, lengths 128 512, 3 repeats
    python bench/bench_engine.py --quick          # smoke run: lengths 32, 1 repeat
"""
from __future__ import annotations

import argparse
import gc
import inspect
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common import (DTYPES, gemv_bandwidth, machine, matmul_peak, min_median, model_folder, parameter_count,
                    prefill_flops)

import torch
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging

from llama_model_loader import Checkpoint
from device_threads import ThreadCollective
from tensor_parallel_cluster import TensorParallelLlama
from head_assignment import even_assignment
from tensor_parallel_model import device_forward, load_device_state


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


class EngineRunner:
    def __init__(self, folder: Path, devices: int, dtype: torch.dtype, backend: str):
        self.model = TensorParallelLlama.load(folder, devices=devices, dtype=dtype, log=lambda m: None,
                                              backend=backend)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.prefill(ids.tolist())

    def decode_times(self, prompt: torch.Tensor, tokens: torch.Tensor) -> list[float]:
        self.model.prefill(prompt.tolist())
        times = []
        for token in tokens.tolist():
            started = time.perf_counter()
            self.model.decode(token)
            times.append(time.perf_counter() - started)
        return times

    def close(self) -> None:
        self.model.close()


class OneDeviceInMainThread:
    """The same device code for a single device, called in the main thread with its default threads
    (decode only): the split and the device threads taken apart from the arithmetic. It is a model of
    its own (no actor), so nothing reaches into a device."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        checkpoint = Checkpoint(folder)
        self.state = load_device_state(checkpoint, even_assignment(checkpoint.config, 1), 0, dtype)
        self.collective = ThreadCollective([0], epoch=0)

    def decode_times(self, prompt: torch.Tensor, tokens: torch.Tensor) -> list[float]:
        device_forward(self.state, prompt, 0, self.collective)
        times = []
        for position, token in enumerate(tokens.tolist(), start=len(prompt)):
            started = time.perf_counter()
            device_forward(self.state, torch.tensor([token]), position, self.collective)
            times.append(time.perf_counter() - started)
        return times

    def close(self) -> None:
        del self.state


class ReferenceRunner:
    def __init__(self, folder: Path, dtype: torch.dtype):
        self.model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
        # transformers 5.x renamed past_key_values to cache (the old name still works, with a warning)
        self.cache_name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, cache: bool = False):
        out = self.model(input_ids=ids[None], use_cache=True, logits_to_keep=1)
        return out if cache else out.logits[0, -1].float()

    @torch.inference_mode()
    def decode_times(self, prompt: torch.Tensor, tokens: torch.Tensor) -> list[float]:
        past = getattr(self.prefill(prompt, cache=True), self.cache_name)
        times = []
        for token in tokens:
            started = time.perf_counter()
            out = self.model(input_ids=token.view(1, 1), use_cache=True, logits_to_keep=1, **{self.cache_name: past})
            past = getattr(out, self.cache_name)
            times.append(time.perf_counter() - started)
        return times

    def close(self) -> None:
        del self.model


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


def bench_dtype(folder: Path, dtype_name: str, args: argparse.Namespace, ids: torch.Tensor) -> None:
    """For each backend in turn: its engine against the reference, alternating; then one device."""
    dtype = DTYPES[dtype_name]
    limits = MachineLimits(matmul_peak(dtype), gemv_bandwidth(dtype))
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
    print_table(dtype_name, args, rows, limits, Checkpoint(folder), loads, reference_load, checks)


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
    single = OneDeviceInMainThread(folder, dtype)
    try:
        e, r = alternate(lambda: statistics.median(single.decode_times(prompt, steps)) * 1e3,
                         lambda: statistics.median(reference.decode_times(prompt, steps)) * 1e3, repeats)
    finally:
        single.close()
    return Row("decode, the device code as 1 device in the main thread (no device threads)", "ms/token", e, r)


def print_table(dtype_name: str, args: argparse.Namespace, rows: list[Row], limits: MachineLimits,
                checkpoint: Checkpoint, engine_loads: dict[str, float], reference_load: float,
                checks: dict[str, tuple[float, bool]]) -> None:
    config = checkpoint.config
    stored = {"BF16": "bfloat16", "F32": "float32"}.get(checkpoint.stored_dtype)
    lazy_note = (" (the stored dtype: transformers memory-maps the file and pages weights in during the warm-up)"
                 if stored == dtype_name else "")
    print(f"\n### {dtype_name}\n")
    print(f"Machine: {machine()}; main thread {torch.get_num_threads()} torch threads (reference, matmul peak); "
          f"engine: {args.devices} devices (threads of this process, or processes) x 1 intra-op thread. "
          f"{args.repeats} repeats after 1 warm-up each, alternating. Load: "
          + ", ".join(f"engine on {b} {s:.1f} s" for b, s in engine_loads.items())
          + f", reference {reference_load:.1f} s{lazy_note}. Last-token logits, engine vs reference: "
          + "; ".join(f"{b} max |diff| / max |ref| = {d:.1e}, same argmax: {same}" for b, (d, same) in checks.items())
          + ".\n")
    print("| what | engine median (min) | reference median (min) | ratio ref/engine |")
    print("|---|---|---|---|")
    for row in rows:
        (e_min, e_med), (r_min, r_med) = min_median(row.engine), min_median(row.reference)
        fmt = "{:.3f}" if row.unit == "s" else "{:.1f}"
        print(f"| {row.what} ({row.unit}) | {fmt.format(e_med)} ({fmt.format(e_min)}) | "
              f"{fmt.format(r_med)} ({fmt.format(r_min)}) | {r_med / e_med:.2f} |")
    longest = max(args.lengths)
    flops = prefill_flops(config, longest)
    peak = limits.matmul_flops
    print(f"\nMatmul peak (torch.mm 2048x2048 {dtype_name}, main thread, best of 10): {peak / 1e9:.0f} GFLOP/s. "
          f"Prefill {longest} = {flops / 1e9:.0f} GFLOP (counted from shapes).")
    for row in (r for r in rows if r.what.startswith(f"prefill {longest} tokens")):
        e_rate, r_rate = flops / statistics.median(row.engine), flops / statistics.median(row.reference)
        print(f"- {row.what}: engine {e_rate / 1e9:.0f} GFLOP/s = {e_rate / peak:.0%} of peak, reference beside "
              f"it {r_rate / 1e9:.0f} GFLOP/s = {r_rate / peak:.0%} of peak.")
    streamed = parameter_count(checkpoint) * DTYPES[dtype_name].itemsize
    floor_ms = streamed / limits.gemv_bytes_per_s * 1e3
    print(f"\nDecode floor: a token streams every weight ({streamed / 1e9:.2f} GB; the tied embedding once, as "
          f"the LM head); at the measured matrix-vector bandwidth ({limits.gemv_bytes_per_s / 1e9:.1f} GB/s, "
          f"main thread, 1 GB weight, best of 5) that is {floor_ms:.0f} ms.")
    for decode in (r for r in rows if r.what.startswith("decode after")):
        e_ms, r_ms = statistics.median(decode.engine), statistics.median(decode.reference)
        print(f"- {decode.what}: engine {e_ms / floor_ms - 1:+.0%}, reference {r_ms / floor_ms - 1:+.0%} above it.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="checkpoint folder (default: the synthetic Llama-3.2-1B)")
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--backend", choices=["threads", "processes", "both"], default="threads",
                        help="the engine's devices: threads, processes, or both one after the other (default threads)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-after", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: lengths 32, 1 repeat, 4 decode steps")
    args = parser.parse_args(argv)
    args.backends = ["threads", "processes"] if args.backend == "both" else [args.backend]
    if args.quick:
        args.lengths, args.repeats, args.decode_after, args.decode_steps = [32], 1, 32, 4
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    folder = model_folder(args.model_dir)
    config = Checkpoint(folder).config
    total = max(max(args.lengths), args.decode_after + args.decode_steps)
    ids = torch.randint(0, config.vocab_size, (total,), generator=torch.Generator().manual_seed(args.seed))
    print(f"checkpoint: {folder}")
    started = time.perf_counter()
    for dtype_name in (list(DTYPES) if args.dtype == "both" else [args.dtype]):
        bench_dtype(folder, dtype_name, args, ids)
        gc.collect()
    print(f"\n(benchmark took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
