"""Simulated devices: one thread each, owning its shard and KV cache, summing partials over threads.

`ThreadCollective` is the device boundary: the only way tensors move between devices during a
step. A step in which a device dies is abandoned (the collective is aborted, every waiting device
gets `StepAbandoned`) and redone after recovery, so a dead device never deadlocks the others.
"""
from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from queue import SimpleQueue
from typing import Any, Callable, Sequence

import torch

from tensor_parallel_model import DeviceState


class StepAbandoned(Exception):
    """The step could not finish because a device of its group is gone (or the run is stopping)."""


class DeviceCrashed(Exception):
    """Raised inside a device's own thread when failure injection kills it: the thread ends."""


FaultHook = Callable[[int], None]  # called with the device at every collective call; may raise or block


class ThreadCollective:
    """All-reduce and all-gather between device threads, for one fixed group of devices (an epoch).

    Two barriers per call: one when every partial is in, one when the result is out, so that no
    device can overwrite its slot before every other device has read the previous result. Sums
    run in device order, so results do not depend on thread timing.
    """

    def __init__(self, devices: Sequence[int], epoch: int = 0, fault_hook: FaultHook | None = None):
        self.devices = tuple(devices)
        self.epoch = epoch
        self.fault_hook = fault_hook
        self._slot = {d: i for i, d in enumerate(self.devices)}
        self._inbox: list[Any] = [None] * len(self.devices)
        self._result: Any = None
        self._barrier = threading.Barrier(len(self.devices))
        self._aborted = threading.Event()

    def all_reduce(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        self._deposit(device, tensor)
        if self._slot[device] == 0:
            total = self._inbox[0].clone()
            for part in self._inbox[1:]:
                total += part
            self._result = total
        self._wait()
        return self._result

    def all_gather(self, device: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self._deposit(device, tensor)
        gathered = list(self._inbox)
        self._wait()
        return gathered

    def ring_pass(self, device: int, payload: Any) -> Any:
        """Send `payload` to the next device in ring order; receive the previous device's."""
        self._deposit(device, payload)
        received = self._inbox[self._slot[device] - 1]
        self._wait()
        return received

    def _deposit(self, device: int, payload: Any) -> None:
        if self.fault_hook is not None:
            self.fault_hook(device)
        self._inbox[self._slot[device]] = payload
        self._wait()

    def abort(self) -> None:
        """Release every waiting device with StepAbandoned; later calls fail at once too."""
        self._barrier.abort()
        self._aborted.set()

    def wait_aborted(self) -> None:
        """Block until the collective is aborted (the leader waits so for a device that went silent)."""
        self._aborted.wait()

    @property
    def aborted(self) -> bool:
        return self._barrier.broken

    def _wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise StepAbandoned(f"epoch {self.epoch} collective aborted") from None


Task = Callable[["DeviceWorker"], Any]


class DeviceWorker:
    """A device's thread: runs the tasks it is given, one at a time; `state` is what it holds."""

    def __init__(self, device: int, intra_op_threads: int = 1):
        self.device = device
        self.state: DeviceState | None = None  # set by the task that loads the shard
        self._tasks: SimpleQueue[tuple[Task, Future] | None] = SimpleQueue()
        self._intra_op_threads = intra_op_threads
        self._thread = threading.Thread(target=self._run, name=f"Device-{device}", daemon=True)
        self._thread.start()

    def submit(self, task: Task) -> Future:
        future: Future = Future()
        self._tasks.put((task, future))
        return future

    def stop(self, timeout: float | None = None) -> None:
        self._tasks.put(None)
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        torch.set_num_threads(self._intra_op_threads)  # the devices share the cores: one each
        while (item := self._tasks.get()) is not None:
            task, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(task(self))
            except DeviceCrashed as crash:
                self.state = None  # its memory is gone with it
                future.set_exception(crash)
                return
            except BaseException as error:  # handed to whoever waits on the future
                future.set_exception(error)


def run_on_devices(workers: Sequence[DeviceWorker], task: Task,
                   collective: ThreadCollective | None = None) -> dict[int, Any]:
    """Run `task` on every device at once and wait for their answers.

    A crashed device never answers: the caller learns of it only when the heartbeat monitor
    declares it dead and aborts `collective`; then, as when any device's step is abandoned, the
    whole step raises StepAbandoned, to be redone after recovery. Any other error aborts
    `collective` (so that no device waits for the failed one) and is raised as it is.
    """
    futures = {w.device: w.submit(task) for w in workers}
    pending, silent = set(futures.values()), False
    while pending:
        done, pending = wait(pending, return_when=FIRST_EXCEPTION)
        for future in done:
            error = future.exception()
            if isinstance(error, DeviceCrashed):
                silent = True
            elif error is not None:
                if collective is not None:
                    collective.abort()
                if isinstance(error, StepAbandoned):
                    raise StepAbandoned("a device failed during the step")
                raise error
    if silent:
        if collective is not None:
            collective.wait_aborted()
        raise StepAbandoned("a device stopped answering during the step")
    return {device: future.result() for device, future in futures.items()}
