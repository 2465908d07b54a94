"""Peak memory and time of loading the model split over devices, against the model's own size.

For each dtype, a fresh Python process imports everything, reads its VmRSS (and VmHWM, the kernel's
peak RSS, which is never reset), runs `TensorParallelLlama.load(folder, devices, dtype)`, then
reads VmHWM again. The peak increase is VmHWM after minus VmRSS before; it is divided by the
model's size in the compute dtype (parameters, from the checkpoint's tensor shapes, times the
dtype's item size). Target: at most 1.2x.

A sampler thread also reads RssAnon / RssFile every few milliseconds during the load, to say
whether the peak is anonymous memory (tensors, copies, malloc caching) or file pages of the
memory-mapped checkpoint; sampling can miss a short spike, so VmHWM remains the measured peak.

    python bench/bench_load_memory.py                   # float32 and bfloat16, 4 devices
    python bench/bench_load_memory.py --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import DTYPES, GB, memory_status, model_folder, parameter_count

TARGET = 1.2


def measure_load(folder: Path, dtype_name: str, devices: int) -> dict:
    """Runs in the child process: load once, return the measurements."""
    from llama_model_loader import Checkpoint
    from tensor_parallel_cluster import TensorParallelLlama

    dtype = DTYPES[dtype_name]
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


def run_child(folder: Path, dtype_name: str, devices: int) -> dict:
    command = [sys.executable, __file__, "--child", "--dtype", dtype_name, "--devices", str(devices),
               "--model-dir", str(folder)]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="checkpoint folder (default: the synthetic Llama-3.2-1B)")
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    folder = model_folder(args.model_dir)
    if args.child:
        print(json.dumps(measure_load(folder, args.dtype, args.devices)))
        return
    print(f"checkpoint: {folder}; {args.devices} devices; one fresh process per dtype\n")
    print("| dtype | parameters | model size in dtype | weights held | RSS / HWM before | HWM after | "
          "peak increase | peak / model size | RSS increase after load | sampled peak increase anon / file | "
          "load time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype_name in (list(DTYPES) if args.dtype == "both" else [args.dtype]):
        print(report(run_child(folder, dtype_name, args.devices)), flush=True)
    print("\nWeights held: the tensors the engine keeps (each device's weight slices, norms and vocabulary rows, as the devices describe them). "
          "Load time includes reading the file: after the page cache was emptied it comes from disk (slower).")


if __name__ == "__main__":
    main()
