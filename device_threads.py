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


class GateBarrier:
    """threading.Barrier's job at a quarter of its cost: each waiter sleeps on a lock of its own.

    threading.Barrier wakes its waiters through one shared condition that each must re-acquire in
    turn; here the last arrival releases every waiter's own lock, and they go on at once. That
    matters with two synchronisations per layer per decode step.
    """

    def __init__(self, parties: int):
        self._parties = parties
        self._lock = threading.Lock()
        self._waiting: list[list] = []  # [lock held until the barrier opens, broken?]
        self._broken = False

    @property
    def broken(self) -> bool:
        return self._broken

    def wait(self, action: Callable[[], None] | None = None) -> None:
        """Block until every party has arrived; the last to arrive runs `action` first, alone."""
        gate = [threading.Lock(), False]
        gate[0].acquire()
        with self._lock:
            if self._broken:
                raise threading.BrokenBarrierError
            if len(self._waiting) + 1 == self._parties:
                if action is not None:
                    self._run_action(action)
                waiting, self._waiting = self._waiting, []
                for other in waiting:
                    other[0].release()
                return
            self._waiting.append(gate)
        gate[0].acquire()
        if gate[1]:
            raise threading.BrokenBarrierError

    def abort(self) -> None:
        """Release every waiter with BrokenBarrierError; later waits fail at once."""
        with self._lock:
            self._break()

    def _run_action(self, action: Callable[[], None]) -> None:
        """Run the last arrival's action (lock held); if it fails, nobody waits for it."""
        try:
            action()
        except BaseException:
            self._break()
            raise

    def _break(self) -> None:
        self._broken = True
        waiting, self._waiting = self._waiting, []
        for gate in waiting:
            gate[1] = True
            gate[0].release()


class ThreadCollective:
    """The collective operations between device threads, for one group of devices (an epoch).

    Every call is a round: each device deposits its tensor, waits at a barrier, and reads the
    others'. Rounds alternate between two sets of slots, so that a fast device depositing the
    next round never overwrites what a slow one is still reading: one barrier per round. Sums
    run in device order, so results do not depend on thread timing. An all-reduce is summed once,
    by the last device to arrive, and shared (it is small: decode); a reduce-scatter has every
    device sum its own rows; an all-gather of rows has each device write its rows into one
    shared tensor, so nothing is copied twice.
    """

    def __init__(self, devices: Sequence[int], epoch: int = 0, fault_hook: FaultHook | None = None):
        self.devices = tuple(devices)
        self.epoch = epoch
        self.fault_hook = fault_hook
        self._slot = {d: i for i, d in enumerate(self.devices)}
        self._rounds = [0] * len(self.devices)  # calls made by each device (all make the same calls)
        self._inbox: list[list[Any]] = [[None] * len(self.devices) for _ in range(2)]
        self._results: list[tuple[int, torch.Tensor] | None] = [None, None]  # per parity: (round, shared result)
        self._results_lock = threading.Lock()
        self._barrier = GateBarrier(len(self.devices))
        self._aborted = threading.Event()

    def all_reduce(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        round_, parity = self._deposit(device, tensor)

        def sum_once() -> None:  # run by the last device to arrive, before the others go on
            self._results[parity] = (round_, _sum_in_order(self._inbox[parity]))

        self._wait(sum_once)
        return self._results[parity][1]

    def own_rows(self, device: int, length: int) -> slice:
        slot, n = self._slot[device], len(self.devices)
        return slice(slot * length // n, (slot + 1) * length // n)

    def reduce_scatter(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        rows = self.own_rows(device, tensor.shape[0])
        return _sum_in_order([part[rows] for part in self._exchange(device, tensor)])

    def all_gather_rows(self, device: int, rows: torch.Tensor, length: int) -> torch.Tensor:
        round_, parity = self._enter(device)
        with self._results_lock:  # the first device of the round makes the tensor all of them fill
            if self._results[parity] is None or self._results[parity][0] != round_:
                self._results[parity] = (round_, rows.new_empty((length, *rows.shape[1:])))
            whole = self._results[parity][1]
        whole[self.own_rows(device, length)] = rows
        self._wait()
        return whole

    def all_gather(self, device: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        return self._exchange(device, tensor)

    def ring_pass(self, device: int, payload: Any) -> Any:
        """Send `payload` to the next device in ring order; receive the previous device's."""
        return self._exchange(device, payload)[self._slot[device] - 1]

    def _enter(self, device: int) -> tuple[int, int]:
        """A device starts its next round (where injected faults strike): the round and its parity."""
        if self.fault_hook is not None:
            self.fault_hook(device)
        slot = self._slot[device]
        self._rounds[slot] += 1
        return self._rounds[slot], self._rounds[slot] % 2

    def _deposit(self, device: int, payload: Any) -> tuple[int, int]:
        """Start the device's next round with `payload` in its slot: the round and its parity."""
        round_, parity = self._enter(device)
        self._inbox[parity][self._slot[device]] = payload
        return round_, parity

    def _exchange(self, device: int, payload: Any) -> list[Any]:
        """Deposit, wait for everyone, and read every device's deposit of this round."""
        parity = self._deposit(device, payload)[1]
        self._wait()
        return list(self._inbox[parity])

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

    def _wait(self, action: Callable[[], None] | None = None) -> None:
        try:
            self._barrier.wait(action)
        except threading.BrokenBarrierError:
            raise StepAbandoned(f"epoch {self.epoch} collective aborted") from None


def _sum_in_order(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


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
        done, pending = wait(pending, timeout=0.05, return_when=FIRST_EXCEPTION)
        if pending and collective is not None and collective.aborted:
            raise StepAbandoned("a device stopped answering during the step")  # declared dead meanwhile
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
