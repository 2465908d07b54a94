"""The thread backend: each device an actor on threads of this process, inboxes as queues, and the
collectives of each epoch over a shared barrier.

What a backend gives the devices (see device_protocol.py): inboxes, `send(address, envelope)`, and
for each epoch a collective among its members (all-reduce, reduce-scatter, all-gather, point-to-
point send/recv). Nothing else crosses between devices. `Codec` says how a payload crosses: as it
is (threads share memory; senders pass copies), or as bytes (`BytesCodec`: every message and every
collective payload pickled and unpickled, so that any shortcut through shared memory breaks: the
test-only "serialising" backend). A step in which a device dies is abandoned (its epoch's
collective is aborted, every waiting device gets `StepAbandoned`) and redone after recovery. No
wait in a collective outlasts its limit (`HeartbeatConfig.call_limit_s`): a peer that never comes
ends it with `WaitStalled`. What the thread backend shares with the processes backend (the epoch
groups' life cycle, inboxes, the threads it keeps) is in device_network.py.
"""
from __future__ import annotations

import pickle
import signal
import threading
import time
from contextlib import contextmanager
from queue import Empty, SimpleQueue
from typing import Any, Callable, Iterator, Sequence

import torch

from device_network import (POLL_S, WAIT_LIMIT_S, DeviceThreads, EpochGroup, EpochGroups, Inboxes, StepAbandoned,
                            row_split, stalled, sum_in_order)
from device_protocol import Address, Envelope


# --------------------------------------------------------------------------------------------
# How payloads cross


class Codec:
    """Payloads cross as they are: threads share memory (senders pass copies they no longer touch)."""

    name = "threads"
    shares_memory = True

    def encode(self, payload: Any) -> Any:
        return payload

    def decode(self, data: Any) -> Any:
        return data


class BytesCodec(Codec):
    """Every payload becomes bytes and back, as between processes: nothing is shared."""

    name = "serialising"
    shares_memory = False

    def encode(self, payload: Any) -> bytes:
        return pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)

    def decode(self, data: bytes) -> Any:
        return pickle.loads(data)


CODECS = {codec.name: codec for codec in (Codec(), BytesCodec())}


# --------------------------------------------------------------------------------------------
# The collectives of one epoch


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

    def wait(self, action: Callable[[], None] | None = None, timeout_s: float = -1) -> bool:
        """Block until every party has arrived (the last to arrive runs `action` first, alone): True.
        False if they have not all come within `timeout_s`: the barrier is then broken for everyone."""
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
                return True
            self._waiting.append(gate)
        if not gate[0].acquire(timeout=timeout_s):
            with self._lock:
                if any(other is gate for other in self._waiting):
                    self._break()
                    return False
            gate[0].acquire()  # the barrier opened (or broke) as the wait ended: its gate is released
        if gate[1]:
            raise threading.BrokenBarrierError
        return True

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


class ThreadCollective(EpochGroup):
    """The collective operations between the member devices of one epoch.

    Every call is a round: each device deposits its payload, waits at a barrier, and reads the
    others'. Rounds alternate between two sets of slots, so that a fast device depositing the
    next round never overwrites what a slow one is still reading: one barrier per round. Sums
    run in member order, so results do not depend on thread timing. When memory is shared, an
    all-reduce is summed once, by the last device to arrive, and shared (it is small: decode), and
    an all-gather of rows has each device write its rows into one shared tensor; as bytes, every
    device decodes its own copy. Point-to-point sends go through one queue per (sender, receiver).
    Once aborted (a member is gone) or ended (a later epoch began), every call fails. A wait that
    sees no one come for `wait_limit_s` ends with WaitStalled (a round's then breaks the group).
    """

    def __init__(self, members: Sequence[int], epoch: int, codec: Codec = Codec(), wait_limit_s: float = WAIT_LIMIT_S):
        super().__init__(members, epoch)
        self.codec = codec
        self.wait_limit_s = wait_limit_s
        self._slot = {d: i for i, d in enumerate(self.devices)}
        self._rounds = [0] * len(self.devices)  # calls made by each device (all make the same calls)
        self._inbox: list[list[Any]] = [[None] * len(self.devices) for _ in range(2)]
        self._results: list[tuple[int, Any] | None] = [None, None]  # per parity: (round, shared result)
        self._lock = threading.Lock()
        self._barrier = GateBarrier(len(self.devices))
        self._channels: dict[tuple[int, int], SimpleQueue] = {}

    # The calls of tensor_parallel_model.Collective

    def all_reduce(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        round_, parity = self._deposit(device, tensor)

        def sum_once() -> None:  # run by the last device to arrive, before the others go on
            total = sum_in_order([self.codec.decode(part) for part in self._inbox[parity]])
            self._results[parity] = (round_, self.codec.encode(total))

        self._wait(device, "all_reduce", round_, sum_once)
        return self.codec.decode(self._results[parity][1])

    def own_rows(self, device: int, length: int) -> slice:
        return row_split(self._slot[device], len(self.devices), length)

    def reduce_scatter(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        rows = self.own_rows(device, tensor.shape[0])
        return sum_in_order([part[rows] for part in self._exchange(device, tensor, "reduce_scatter")])

    def all_gather_rows(self, device: int, rows: torch.Tensor, length: int) -> torch.Tensor:
        if not self.codec.shares_memory:
            return torch.cat(self._exchange(device, rows, "all_gather_rows"))
        round_, parity = self._enter(device)
        with self._lock:  # the first device of the round makes the tensor all of them fill
            if self._results[parity] is None or self._results[parity][0] != round_:
                self._results[parity] = (round_, rows.new_empty((length, *rows.shape[1:])))
            whole = self._results[parity][1]
        whole[self.own_rows(device, length)] = rows
        self._wait(device, "all_gather_rows", round_)
        return whole

    def all_gather(self, device: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        return self._exchange(device, tensor, "all_gather")

    def send(self, device: int, to: int, payload: Any) -> None:
        """Hand `payload` to device `to` (it gets it with `recv`); does not wait for it."""
        self.refuse_if_closed()
        self._channel(device, to).put(self.codec.encode(payload))

    def flush(self) -> None:
        """Nothing to wait for: a send is in the receiver's queue when `send` returns."""

    def recv(self, device: int, source: int) -> Any:
        """What device `source` sent to this device, waiting for it until it comes, the epoch ends, or
        the wait limit passes (WaitStalled)."""
        channel = self._channel(source, device)
        deadline = time.monotonic() + self.wait_limit_s
        while True:
            self.refuse_if_closed()
            try:
                return self.codec.decode(channel.get(timeout=min(POLL_S, max(0.0, deadline - time.monotonic()))))
            except Empty:
                if time.monotonic() >= deadline:
                    raise stalled(device, [source], "recv", self.epoch, self.wait_limit_s) from None

    # Lifetime

    def abort(self) -> None:
        """Release every waiting device with StepAbandoned; later calls fail at once too."""
        self._barrier.abort()

    @property
    def aborted(self) -> bool:
        return self._barrier.broken

    # Rounds

    def _enter(self, device: int) -> tuple[int, int]:
        self.refuse_if_closed()
        slot = self._slot[device]
        self._rounds[slot] += 1
        return self._rounds[slot], self._rounds[slot] % 2

    def _deposit(self, device: int, payload: Any) -> tuple[int, int]:
        """Start the device's next round with `payload` in its slot: the round and its parity."""
        round_, parity = self._enter(device)
        self._inbox[parity][self._slot[device]] = self.codec.encode(payload)
        return round_, parity

    def _exchange(self, device: int, payload: Any, call: str) -> list[Any]:
        """Deposit, wait for everyone, and read every device's deposit of this round."""
        round_, parity = self._deposit(device, payload)
        self._wait(device, call, round_)
        return [self.codec.decode(part) for part in self._inbox[parity]]

    def _wait(self, device: int, call: str, round_: int, action: Callable[[], None] | None = None) -> None:
        try:
            opened = self._barrier.wait(action, self.wait_limit_s)
        except threading.BrokenBarrierError:
            self.refuse_if_closed()
            raise StepAbandoned(f"epoch {self.epoch} collective aborted") from None
        if not opened:
            absent = [d for d, slot in self._slot.items() if self._rounds[slot] < round_]
            raise stalled(device, absent, call, self.epoch, self.wait_limit_s)

    def _channel(self, source: int, to: int) -> SimpleQueue:
        with self._lock:
            return self._channels.setdefault((source, to), SimpleQueue())


# --------------------------------------------------------------------------------------------
# Inboxes and groups


class ThreadTransport(DeviceThreads):
    """Inboxes (one queue per Address) and one collective per epoch (device_network.EpochGroups),
    for devices on threads. The transport is the network: it knows which groups exist, not what any
    device holds."""

    real_signals = False  # faults are simulated inside the threads (processes: real signals)

    def __init__(self, codec: Codec = Codec(), wait_limit_s: float = WAIT_LIMIT_S):
        super().__init__()
        self.codec = codec
        self.name = codec.name
        self._inboxes = Inboxes()
        self._groups = EpochGroups(lambda epoch, members: ThreadCollective(members, epoch, codec, wait_limit_s))

    def send(self, to: Address, envelope: Envelope) -> None:
        self._inboxes.put(to, self.codec.encode(envelope))

    def receive(self, address: Address, timeout: float | None) -> Envelope | None:
        """The next envelope in `address`'s inbox, or None after `timeout` seconds."""
        data = self._inboxes.get(address, timeout)
        return None if data is None else self.codec.decode(data)

    def collective(self, epoch: int, members: Sequence[int]) -> ThreadCollective:
        """The collective of `epoch`'s group (made on first use; earlier epochs' groups end)."""
        return self._groups.get(epoch, members)

    def abort_epoch(self, epoch: int) -> None:
        """Release whoever waits in `epoch`'s collective (a member is gone), if that group was formed."""
        self._groups.abort(epoch)

    def fence(self, device: int) -> None:
        """Nothing to kill: on threads a declared device is fenced by its epoch alone."""

    def processes(self) -> list[dict[str, int]]:
        """No device processes: every device is a thread of this one."""
        return []


# --------------------------------------------------------------------------------------------
# Ctrl-C, acted on where the driver waits

_interrupt = {"requested": False}


@contextmanager
def interrupts_at_wait_points() -> Iterator[None]:
    """While active, Ctrl-C (SIGINT) only records a request, and the driver's waits raise
    KeyboardInterrupt when they next look (every POLL_S).

    Python raises KeyboardInterrupt at whatever line the main thread is running. Inside a
    concurrent.futures or queue wait that can be while it holds a lock the device threads need:
    they then block for ever, and stopping takes as long as every join's timeout (seen as a demo
    still running 10 s after Ctrl-C on a loaded machine). Acted on at a wait, the interrupt never
    lands inside a lock. A second Ctrl-C acts at once.
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
