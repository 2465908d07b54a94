"""Helpers shared by the benchmarks: the command line, the checkpoint folder, FLOPs from shapes, RSS,
matmul peak.

Importing this module is cheap (no torch): a benchmark builds its parser, checks its arguments and
the checkpoint's config.json, and answers a mistake in a fraction of a second; torch and the
engine are imported once there is work to do (inside the functions that need them).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable; the reference loads local folders
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from heartbeat_detection import HeartbeatConfig  # noqa: E402
from llama_config import CheckpointError, LlamaConfig  # noqa: E402
from provenance import machine_summary  # noqa: E402

if TYPE_CHECKING:
    import torch

    from llama_model_loader import Checkpoint

GB = 1e9


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line on stderr (`<prog>: error: ...`) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_with_quick(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                     quick: dict[str, Any]) -> argparse.Namespace:
    """Parse `argv`; with --quick, `quick` replaces the defaults (an option given on the line still wins)."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def log(message: str) -> None:
    """A timestamped progress line on stderr (stdout carries the tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def torch_dtype(name: str) -> "torch.dtype":
    import torch
    return getattr(torch, name)


def check_model_dir(parser: argparse.ArgumentParser, model_dir: str | None) -> LlamaConfig | None:
    """--model-dir's config.json, read and checked without torch (a mistake is a one-line error);
    None without --model-dir (the synthetic Llama-3.2-1B, written on first use)."""
    if model_dir is None:
        return None
    folder = Path(model_dir)
    if not folder.is_dir():
        parser.error(f"--model-dir {folder}: no such folder")
    try:
        return LlamaConfig.from_json(folder / "config.json")
    except CheckpointError as bad:
        parser.error(f"--model-dir {bad}")


def heartbeat_configs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, HeartbeatConfig]:
    """The heartbeats of each --detector, from --heartbeat-interval/-timeout and --phi-threshold
    (a value they refuse is a one-line error)."""
    try:
        return {detector: HeartbeatConfig(args.heartbeat_interval, args.heartbeat_timeout, detector,
                                          args.phi_threshold) for detector in args.detector}
    except ValueError as bad:
        parser.error(str(bad))


def model_folder(model_dir: str | None) -> Path:
    """--model-dir if given, else the cached synthetic Llama-3.2-1B (honours $KV_REUSE_CACHE)."""
    if model_dir:
        return Path(model_dir)
    from synthetic_checkpoint import ensure_synthetic_checkpoint
    return ensure_synthetic_checkpoint("llama-3.2-1b", log=lambda m: print(m, file=sys.stderr))


def parameter_count(checkpoint: Checkpoint) -> int:
    """Parameters of the checkpoint, from its tensor shapes (the tied embedding counted once)."""
    total = 0
    for shape in checkpoint.shapes.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def prefill_flops(config: LlamaConfig, length: int) -> int:
    """FLOPs of a prefill of `length` tokens, counted from shapes (1 multiply-add = 2 FLOPs).

    Per token per layer: the Q/K/V/O projections and the three MLP matmuls. Per layer: causal
    attention, QK^T and PV over L*L/2 pairs per head. Logits of the last token only. Norms, RoPE,
    softmax and the residual adds are left out (well under 1%).
    """
    h, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q = o = config.num_attention_heads * hd
    k = v = config.num_key_value_heads * hd
    per_token_layer = 2 * (h * (q + k + v + o) + 3 * h * inter)
    attention_layer = 2 * 2 * (length * length // 2) * hd * config.num_attention_heads
    layers = config.num_hidden_layers * (length * per_token_layer + attention_layer)
    return layers + 2 * h * config.vocab_size


def best_seconds(run: Callable[[], object], tries: int) -> float:
    """The fastest of `tries` timed calls of `run`, after one untimed warm-up."""
    run()
    best = float("inf")
    for _ in range(tries):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def matmul_peak(dtype: torch.dtype, n: int = 2048, tries: int = 10) -> float:
    """Best FLOP/s of torch.mm on n x n in `dtype`, in the calling thread with its default threads."""
    import torch
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n ** 3 / best_seconds(lambda: torch.mm(a, b), tries)


def gemv_bandwidth(dtype: torch.dtype, nbytes: int = 1 << 30, tries: int = 5) -> float:
    """Best bytes/s at which a matrix-vector product streams a `nbytes` weight (decode's bound),
    in the calling thread with its default threads."""
    import torch
    weight = torch.randn(nbytes // (2048 * dtype.itemsize), 2048).to(dtype)
    x = torch.randn(1, 2048).to(dtype)
    return weight.nbytes / best_seconds(lambda: torch.nn.functional.linear(x, weight), tries)


def memory_status() -> dict[str, int]:
    """This process's VmRSS and VmHWM (peak RSS), in bytes, from /proc/self/status."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def machine() -> str:
    """The machine (provenance.machine_summary), torch's version and CPU capability, for a table's heading."""
    import torch
    return (f"{machine_summary()}, torch {torch.__version__} "
            f"(CPU capability {torch.backends.cpu.get_cpu_capability()})")


def min_median(samples: list[float]) -> tuple[float, float]:
    """(min, median) of timed samples: a table gives the typical time and the best one."""
    return min(samples), statistics.median(samples)
