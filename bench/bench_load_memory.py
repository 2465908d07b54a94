"""Peak memory and time of loading the model split over devices, against the model's own size.

For each dtype, a fresh Python process imports everything, reads its VmRSS (and VmHWM, the kernel's
peak RSS, which is never reset), runs `TensorParallelLlama.load(folder, devices, dtype)`, then
reads VmHWM again. The peak increase is VmHWM after minus VmRSS before; it is divided by the
model's size in the compute dtype (parameters, from the checkpoint's tensor shapes, times the
dtype's item size). Target: at most 1.2x.

A sampler thread also reads RssAnon / RssFile every few milliseconds during the load, to say
whether the peak is anonymous memory (tensors, copies, malloc caching) or file pages of the
memory-mapped checkpoint; sampling can miss a short spike, so VmHWM remains the measured peak.

The table is printed and written to docs/results/load_memory.md (`--results`).

    python bench/bench_load_memory.py                   # float32 and bfloat16, 4 devices
    python bench/bench_load_memory.py --dtype bfloat16
    python bench/bench_load_memory.py --quick           # float32 only, writes no results file
    python bench/bench_load_memory.py --first-load      # also: the first load right after writing the checkpoint

With --first-load, a fresh synthetic Llama-3.2-1B is written into a temporary folder by a child
process, which then loads it at once (as the demo's first run does); a second child loads the same
folder warm. Target: the first load at most twice the warm one.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

from common import (GB, Parser, check_model_dir, memory_status, model_folder, parameter_count,
                    parse_with_quick, torch_dtype)
from device_protocol import DTYPE_NAMES
from provenance import strict_json
from results import add_results_options, resolve_results, save_results, script_argv

TARGET = 1.2
TITLE = "Peak memory and time of loading the model split over devices"


def measure_load(folder: Path, dtype_name: str, devices: int) -> dict:
    """Runs in the child process: load once, return the measurements."""
    from llama_model_loader import Checkpoint
    from tensor_parallel_cluster import TensorParallelLlama

    dtype = torch_dtype(dtype_name)
    parameters = parameter_count(Checkpoint(folder))
    before = memory_status()
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            status = memory_status()
            for key in peaks:
                peaks[key] = max(peaks[key], status[key])
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    model = TensorParallelLlama.load(folder, devices=devices, dtype=dtype, log=lambda m: None)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    after = memory_status()
    held = sum(info.weight_bytes for info in model.describe().values())  # slices, norms, vocabulary rows
    model.close()
    return {"dtype": dtype_name, "devices": devices, "parameters": parameters,
            "model_bytes": parameters * dtype.itemsize, "held_bytes": held, "seconds": seconds,
            "before": before, "after": after, "sampled_peaks": peaks}


def write_then_measure_load(folder: Path, devices: int) -> dict:
    """Runs in the child process: write a fresh synthetic checkpoint, then load it at once."""
    from synthetic_checkpoint import ensure_synthetic_checkpoint
    started = time.perf_counter()
    ensure_synthetic_checkpoint("llama-3.2-1b", 0, folder, log=lambda message: None)
    return {"write_seconds": time.perf_counter() - started, **measure_load(folder, "float32", devices)}


def run_child(folder: Path, dtype_name: str, devices: int, write_first: bool = False) -> dict:
    """measure_load in a fresh process (its VmHWM is this load's peak alone), read back as JSON."""
    command = [sys.executable, __file__, "--child", "--dtype", dtype_name, "--devices", str(devices),
               "--model-dir", str(folder), "--results", "none", *(["--write-first"] if write_first else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the {dtype_name} child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(result: dict) -> str:
    before, after, sampled = result["before"], result["after"], result["sampled_peaks"]
    increase = after["VmHWM"] - before["VmRSS"]
    ratio = increase / result["model_bytes"]
    verdict = "meets" if ratio <= TARGET else "MISSES"
    return (f"| {result['dtype']} | {result['parameters'] / 1e9:.3f} B | {result['model_bytes'] / GB:.2f} GB | "
            f"{result['held_bytes'] / GB:.2f} GB | {before['VmRSS'] / GB:.2f} / {before['VmHWM'] / GB:.2f} GB | "
            f"{after['VmHWM'] / GB:.2f} GB | {increase / GB:.2f} GB | **{ratio:.2f}x** ({verdict} {TARGET}x) | "
            f"{(after['VmRSS'] - before['VmRSS']) / GB:.2f} GB | "
            f"{(sampled['RssAnon'] - before['RssAnon']) / GB:.2f} / {(sampled['RssFile'] - before['RssFile']) / GB:.2f} GB"
            f" | {result['seconds']:.1f} s |")


TABLE_HEAD = ("| dtype | parameters | model size in dtype | weights held | RSS / HWM before | HWM after | "
              "peak increase | peak / model size | RSS increase after load | sampled peak increase anon / file | "
              "load time |\n|---|---|---|---|---|---|---|---|---|---|---|")
NOTE = ("Weights held: the tensors the engine keeps (each device's weight slices, norms and vocabulary rows, as the "
        "devices describe them). Load time includes reading the file: after the page cache was emptied it comes "
        "from disk (slower).")


FIRST_LOAD_TARGET = 2.0


def first_load_table(devices: int) -> str:
    """The first load right after writing the checkpoint against a warm load of it (float32)."""
    with tempfile.TemporaryDirectory(prefix="first-load-") as scratch:
        folder = Path(scratch) / "synthetic-llama-3.2-1b"
        first = run_child(folder, "float32", devices, write_first=True)
        warm = run_child(folder, "float32", devices)
    ratio = first["seconds"] / warm["seconds"]
    verdict = "meets" if ratio <= FIRST_LOAD_TARGET else "MISSES"
    return ("\nThe first load right after writing the synthetic Llama-3.2-1B (float32, one child process writes, "
            "then loads), against a warm load of the same folder in a fresh process:\n\n"
            "| written in | first load | warm load | first / warm |\n|---|---|---|---|\n"
            f"| {first['write_seconds']:.1f} s | {first['seconds']:.1f} s | {warm['seconds']:.1f} s | "
            f"**{ratio:.2f}x** ({verdict} {FIRST_LOAD_TARGET:.0f}x) |")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="checkpoint folder (default: the synthetic Llama-3.2-1B)")
    parser.add_argument("--dtype", choices=[*DTYPE_NAMES, "both"], default="both")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="smoke run: float32 only (unless --dtype is given)")
    parser.add_argument("--first-load", action="store_true",
                        help="also time the first load right after writing a fresh synthetic checkpoint (2.5 GB "
                             "in a temporary folder) against a warm load")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write-first", action="store_true", help=argparse.SUPPRESS)
    add_results_options(parser, "load_memory")
    args = parse_with_quick(parser, argv, {"dtype": "float32"})
    if args.devices < 1:
        parser.error(f"--devices must be at least 1, got {args.devices}")
    config = check_model_dir(parser, None if args.write_first else args.model_dir)  # written by the child itself
    if config is not None and args.devices > config.num_attention_heads:
        parser.error(f"--devices {args.devices} is more than the model's {config.num_attention_heads} query heads")
    resolve_results(args, parser)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        folder = Path(args.model_dir) if args.write_first else model_folder(args.model_dir)
        measured = write_then_measure_load(folder, args.devices) if args.write_first else \
            measure_load(folder, args.dtype, args.devices)
        print(strict_json(measured))
        return 0
    folder = model_folder(args.model_dir)
    started = time.perf_counter()
    heading = f"Checkpoint `{folder}`; {args.devices} devices; one fresh process per dtype.\n"
    print(heading + "\n" + TABLE_HEAD)
    rows = []
    for dtype_name in (list(DTYPE_NAMES) if args.dtype == "both" else [args.dtype]):
        rows.append(report(run_child(folder, dtype_name, args.devices)))
        print(rows[-1], flush=True)
    print("\n" + NOTE)
    first_load = first_load_table(args.devices) if args.first_load else ""
    print(first_load)
    save_results(args, TITLE, "\n".join([heading, TABLE_HEAD, *rows, "", NOTE, first_load]), script_argv(__file__, argv),
                 time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
