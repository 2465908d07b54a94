"""What a decode step costs on processes, apart: bench_engine.py's section "decode step: processes
against threads against bare gloo".

Beside the engine on both backends (engine_runners.EngineRunner), `devices` plain processes form a
gloo group and run the engine's device code (tensor_parallel_model.device_forward) over the
processes backend's own collective (process_collective.DistributedCollective), without the actors,
the leader, the driver or their messages. In each, the gloo group is a `RecordingGroup`: one decode
step's calls on it are noted (operation, tensor shapes and dtypes, in order), so that the bare
timing replays exactly the calls the code of this commit makes, whatever they are, with plain
waits. The repetitions run back to back after one barrier (as steps follow each other), device
code and bare calls alternating, each timed by the first member (the one that answers the logits).
Apart from the script because it needs torch, which the script imports only once its arguments
are known to be good.
"""
from __future__ import annotations

import datetime
import queue
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORKER_WAIT_S = 600.0  # loading the 1B's slices in four processes on two cores takes tens of seconds


@dataclass(frozen=True)
class TensorSpec:
    """A tensor argument of a recorded call: enough to make one like it."""
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Call:
    """One call on the gloo group: its method and its arguments, tensors as TensorSpecs."""
    method: str
    args: tuple

    def describe(self) -> str:
        """'allgather(4 x float32[128], float32[128])': the method and its tensors, runs folded."""
        return f"{self.method}({folded([_spec_text(s) for s in _tensor_specs(self.args)], period=1)})"


@dataclass(frozen=True)
class GlooTimes:
    """What the bare processes measured, per repetition, in seconds, on the first member."""
    calls: tuple[str, ...]    # the recorded calls, each as Call.describe() writes it
    device_code: list[float]  # device_forward over DistributedCollective, no control plane
    bare: list[float]         # the recorded calls replayed, plain waits


class RecordingGroup:
    """A process group that notes every call returning a Work while `recording` (the calls a step
    makes), and otherwise passes everything through."""

    def __init__(self, group: dist.ProcessGroup):
        self.group, self.recording, self.calls = group, False, []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.group, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any) -> Any:
            result = attribute(*args)
            if self.recording and isinstance(result, dist.Work):
                self.calls.append(Call(name, _as_specs(args)))
            return result

        return call


_GROUPS: list[RecordingGroup] = []  # the groups formed in this process (one: the bare processes form one)


def _recording_gloo(real: type) -> Any:
    """A stand-in for dist.ProcessGroupGloo that wraps every group it forms in a RecordingGroup."""
    def form(*args: Any) -> RecordingGroup:
        _GROUPS.append(RecordingGroup(real(*args)))
        return _GROUPS[-1]

    return form


def _as_specs(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_as_specs(v) for v in value)
    return value


def _built(value: Any) -> Any:
    if isinstance(value, TensorSpec):
        return torch.zeros(value.shape, dtype=value.dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_built(v) for v in value)
    return value


def _tensor_specs(value: Any) -> list[TensorSpec]:
    if isinstance(value, TensorSpec):
        return [value]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _tensor_specs(v)]
    return []


def _spec_text(spec: TensorSpec) -> str:
    return f"{str(spec.dtype).removeprefix('torch.')}{list(spec.shape)}"


def folded(texts: Sequence[str], period: int | None = None) -> str:
    """The texts in order, the first run of a repeated block written once: '6 x [a, b], then a, c'.
    `period`: the block's length (default: the shortest that repeats)."""
    for size in ([period] if period else range(1, len(texts) // 2 + 1)):
        block, repeats = list(texts[:size]), 1
        while list(texts[repeats * size:(repeats + 1) * size]) == block:
            repeats += 1
        if repeats > 1:
            rest = texts[repeats * size:]
            head = f"{repeats} x " + (block[0] if size == 1 else f"[{', '.join(block)}]")
            return ", ".join([head, *([f"then {', '.join(rest)}"] if rest else [])])
    return ", ".join(texts)


# --------------------------------------------------------------------------------------------
# One bare process


def _worker(rank: int, size: int, port: int, folder: str, dtype_name: str, prompt: list[int], tokens: list[int],
            results: Any) -> None:
    """One member: its device's slices, one recorded decode step, then the timed repetitions."""
    try:
        results.put((rank, _measure(rank, size, port, Path(folder), getattr(torch, dtype_name), prompt, tokens)))
    except BaseException:  # noqa: BLE001 - the parent raises it, with this trace
        results.put((rank, traceback.format_exc()))


def _measure(rank: int, size: int, port: int, folder: Path, dtype: torch.dtype, prompt: list[int],
             tokens: list[int]) -> tuple[tuple[str, ...], list[float], list[float]]:
    import process_collective
    from head_assignment import even_assignment
    from llama_model_loader import Checkpoint
    from tensor_parallel_model import device_forward, load_device_state

    torch.set_num_threads(1)  # as a device process
    dist.ProcessGroupGloo = _recording_gloo(dist.ProcessGroupGloo)
    checkpoint = Checkpoint(folder)
    state = load_device_state(checkpoint, even_assignment(checkpoint.config, size), rank, dtype)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=WORKER_WAIT_S))
    collective = process_collective.DistributedCollective(store, 0, range(size), rank, WORKER_WAIT_S)
    device_forward(state, torch.tensor(prompt), 0, collective)
    if not _GROUPS:
        raise RuntimeError("DistributedCollective formed no group through torch.distributed.ProcessGroupGloo: "
                           "bench/step_costs.py must learn how the collective forms its group now")
    group = _GROUPS[0]
    position = len(prompt)

    def step() -> None:
        nonlocal position
        device_forward(state, torch.tensor([tokens[position - len(prompt)]]), position, collective)
        position += 1

    group.recording = True
    step()  # the recorded step, untimed
    group.recording = False
    replay = [(call.method, _built(call.args)) for call in group.calls]

    def bare() -> None:
        for method, args in replay:
            getattr(group.group, method)(*args).wait()

    bare()  # warm-up
    group.group.barrier().wait()
    device_code, bare_times = [], []
    for _ in range(len(tokens) - 1):  # back to back, as steps follow each other
        device_code.append(_timed(step))
        bare_times.append(_timed(bare))
    group.group.barrier().wait()  # no member leaves while another still takes its last call's data
    return tuple(call.describe() for call in group.calls), device_code, bare_times


def _timed(run: Any) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# The parent


def time_gloo(folder: Path, devices: int, dtype: torch.dtype, prompt: list[int], tokens: list[int]) -> GlooTimes:
    """Start `devices` bare processes on a gloo group; they run len(tokens) - 1 decode steps of the
    device code and as many replays of the recorded calls, alternating."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    context = mp.get_context("spawn")
    results = context.Queue()
    dtype_name = str(dtype).removeprefix("torch.")
    workers = [context.Process(target=_worker, args=(rank, devices, store.port, str(folder), dtype_name, prompt,
                                                     tokens, results), daemon=True) for rank in range(devices)]
    try:
        for worker in workers:
            worker.start()
        measured = _collect(results, workers)
    finally:
        for worker in workers:
            worker.join(timeout=10.0)
            if worker.is_alive():
                worker.kill()
    calls, device_code, bare = measured[0]  # as the first member sees them: the one that answers the logits
    return GlooTimes(calls, device_code, bare)


def _collect(results: Any, workers: Sequence[Any]) -> list[tuple]:
    """Every member's measurement, in rank order; a member's failure is raised with its trace, and a
    member that ends without an answer (killed, or unable to start) at once."""
    measured: dict[int, Any] = {}
    deadline = time.monotonic() + WORKER_WAIT_S
    while len(measured) < len(workers):
        try:
            rank, value = results.get(timeout=1.0)
        except queue.Empty:
            gone = [rank for rank, worker in enumerate(workers) if rank not in measured and not worker.is_alive()]
            if gone or time.monotonic() > deadline:
                raise RuntimeError(f"bare gloo processes {gone or 'all'} gave no answer (ended, or "
                                   f"{WORKER_WAIT_S:.0f} s passed)") from None
            continue
        if isinstance(value, str):
            raise RuntimeError(f"bare gloo process {rank} failed:\n{value}")
        measured[rank] = value
    return [measured[rank] for rank in range(len(workers))]
