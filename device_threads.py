"""Simulated devices: one thread each, owning its shard and KV cache, summing partials over threads.

`ThreadCollective` is the device boundary: the only way tensors move between devices during a
step. A step in which a device dies is abandoned (the collective is aborted, every waiting device
gets `StepAbandoned`) and redone after recovery, so a dead device never deadlocks the others.
Every call carries its sender's epoch; a call from a device that missed a declaration of death, or
into a collective of an epoch that has ended, is refused (`StaleEpoch`): that is the fencing.
"""
from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from queue import SimpleQueue
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from tensor_parallel_model import DeviceState

POLL_S = 0.05  # how often a waiting leader looks at the devices, the monitor's verdicts and Ctrl-C


class StepAbandoned(Exception):
    """The step could not finish because a device of its group is gone (or the run is stopping)."""


class StaleEpoch(StepAbandoned):
    """A message stamped with an epoch that has ended: its sender was fenced out."""


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


class EpochView(Protocol):
    """What the fencing needs to know: the leader's current epoch and each device's own."""

    def current(self) -> int: ...

    def of(self, device: int) -> int: ...


class ThreadCollective:
    """The collective operations between device threads, for one group of devices (an epoch).

    Every call is a round: each device deposits its tensor, waits at a barrier, and reads the
    others'. Rounds alternate between two sets of slots, so that a fast device depositing the
    next round never overwrites what a slow one is still reading: one barrier per round. Sums
    run in device order, so results do not depend on thread timing. An all-reduce is summed once,
    by the last device to arrive, and shared (it is small: decode); a reduce-scatter has every
    device sum its own rows; an all-gather of rows has each device write its rows into one
    shared tensor, so nothing is copied twice.

    With `epochs`, every call is checked before it touches anything: the sender's own epoch and
    this collective's must both be the leader's current one. `lost` names the devices whose
    silence aborted it (no one waits for their answers); `silence_bound_s` bounds how long a
    leader waits for a crashed device to be declared dead.
    """

    def __init__(self, devices: Sequence[int], epoch: int = 0, fault_hook: FaultHook | None = None,
                 epochs: EpochView | None = None, silence_bound_s: float = 60.0):
        self.devices = tuple(devices)
        self.epoch = epoch
        self.fault_hook = fault_hook
        self.epochs = epochs
        self.silence_bound_s = silence_bound_s
        self.lost: frozenset[int] = frozenset()
        self._slot = {d: i for i, d in enumerate(self.devices)}
        self._rounds = [0] * len(self.devices)  # calls made by each device (all make the same calls)
        self._inbox: list[list[Any]] = [[None] * len(self.devices) for _ in range(2)]
        self._results: list[tuple[int, torch.Tensor] | None] = [None, None]  # per parity: (round, shared result)
        self._results_lock = threading.Lock()
        self._barrier = GateBarrier(len(self.devices))

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
        self._refuse_stale(device)
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

    def _refuse_stale(self, device: int) -> None:
        """Fencing: a call stamped with an ended epoch, or into an ended epoch's collective, goes nowhere."""
        if self.epochs is None:
            return
        sender, current = self.epochs.of(device), self.epochs.current()
        if sender != self.epoch or self.epoch != current:
            raise StaleEpoch(f"Device-{device} called with epoch {sender} into epoch {self.epoch}'s collective "
                             f"(current epoch {current}): refused")

    def abort(self, lost: Sequence[int] = ()) -> None:
        """Release every waiting device with StepAbandoned; later calls fail at once too. `lost`: the
        devices that went silent (the leader does not wait for them to answer)."""
        with self._results_lock:
            self.lost = self.lost | frozenset(lost)
        self._barrier.abort()

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


def run_on_devices(workers: Sequence[DeviceWorker], task: Task, collective: ThreadCollective) -> dict[int, Any]:
    """Run `task` on every device at once and wait for their answers.

    A crashed device never answers: the caller learns of it only when the heartbeat monitor
    declares it dead and aborts `collective`; then, as when any device's step is abandoned, the
    whole step raises StepAbandoned, to be redone after recovery. Any other error aborts
    `collective` (so that no device waits for the failed one), and once every device not lost has
    answered, the first such error in device order is raised: a peer's StepAbandoned, which the
    abort caused, never hides it. Every wait is bounded, and Ctrl-C is acted on here (see
    `interrupts_at_wait_points`).
    """
    futures = {w.device: w.submit(task) for w in workers}
    crashed_at: float | None = None
    while True:
        raise_if_interrupted()
        errors = {d: f.exception() for d, f in futures.items() if f.done() and f.exception() is not None}
        if any(not isinstance(e, DeviceCrashed) for e in errors.values()):
            collective.abort()  # nobody waits for a device whose step failed
        waiting = [f for d, f in futures.items() if not f.done() and d not in collective.lost]
        if not waiting:
            break
        if any(isinstance(e, DeviceCrashed) for e in errors.values()) and not collective.aborted:
            crashed_at = crashed_at or time.monotonic()
            if time.monotonic() - crashed_at > collective.silence_bound_s:
                raise RuntimeError(f"a device crashed but was not declared dead within "
                                   f"{collective.silence_bound_s:.1f} s")
        wait(waiting, timeout=POLL_S, return_when=FIRST_COMPLETED)
    errors = {d: f.exception() for d, f in futures.items() if f.done() and f.exception() is not None}
    root = next((e for _, e in sorted(errors.items()) if not isinstance(e, (DeviceCrashed, StepAbandoned))), None)
    if root is not None:
        raise root
    if errors or collective.aborted:
        raise StepAbandoned("a device failed or stopped answering during the step")
    return {device: future.result() for device, future in futures.items()}


# --------------------------------------------------------------------------------------------
# Ctrl-C, acted on where the leader waits

_interrupt = {"requested": False}


@contextmanager
def interrupts_at_wait_points() -> Iterator[None]:
    """While active, Ctrl-C (SIGINT) only records a request, and the leader's waits raise
    KeyboardInterrupt when they next look (every POLL_S).

    Python raises KeyboardInterrupt at whatever line the main thread is running. Inside
    concurrent.futures.wait() that can be while it holds the futures' locks: the device threads
    then block for ever on those locks when they answer, and stopping takes as long as every
    join's timeout (seen as a demo still running 10 s after Ctrl-C on a loaded machine). Acted on
    at a wait, the interrupt never lands inside a lock. A second Ctrl-C acts at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def request(signum, frame) -> None:
        _interrupt["requested"] = True
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, request)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupt["requested"] = False


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed since the last look (a safe point to stop)."""
    if _interrupt["requested"]:
        _interrupt["requested"] = False
        raise KeyboardInterrupt
