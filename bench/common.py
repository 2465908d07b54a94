"""Helpers shared by the benchmarks: the checkpoint folder, FLOPs from shapes, RSS, matmul peak."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable; the reference loads local folders
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llama_model_loader import Checkpoint, LlamaConfig  # noqa: E402
from synthetic_checkpoint import ensure_synthetic_checkpoint  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GB = 1e9


def model_folder(model_dir: str | None) -> Path:
    """--model-dir if given, else the cached synthetic Llama-3.2-1B (honours $KV_REUSE_CACHE)."""
    if model_dir:
        return Path(model_dir)
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
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n ** 3 / best_seconds(lambda: torch.mm(a, b), tries)


def gemv_bandwidth(dtype: torch.dtype, nbytes: int = 1 << 30, tries: int = 5) -> float:
    """Best bytes/s at which a matrix-vector product streams a `nbytes` weight (decode's bound),
    in the calling thread with its default threads."""
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
    """CPU model, cores, RAM and torch version, for the table heading."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        ram = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except OSError:
        ram = 0
    return (f"{cpu}, {os.cpu_count()} cores, {ram / 2**30:.0f} GiB RAM, "
            f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()})")


def min_median(samples: list[float]) -> tuple[float, float]:
    return min(samples), statistics.median(samples)
