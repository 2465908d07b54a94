"""What every backend gives the devices, and what the backends share, written once below them.

A backend (device_threads.py: threads of one process; the processes backend: process_network.py
with process_collective.py, started by process_launcher.py) provides inboxes and, for each epoch, a
collective among its members. The leader (cluster_leader.py) and the devices (device_actor.py) are
written against this module only, never against a backend: the protocols (`EpochCollective`,
`Transport`), the errors a wait ends in, how often a waiting thread looks up, the rows a member
holds, the sum in member order, the registry of epoch groups, inboxes and a transport's threads.
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any, Callable, Generic, Hashable, Protocol, Sequence, TypeVar

from heartbeat_detection import HeartbeatConfig
from tensor_parallel_model import Collective

if TYPE_CHECKING:
    import torch

    from device_protocol import Address, Envelope

POLL_S = 0.05  # how often a waiting thread looks at aborts, the monitor's verdicts and Ctrl-C
WAIT_LIMIT_S = HeartbeatConfig().call_limit_s  # the default heartbeats' bound on a call, for a collective made without one


class StepAbandoned(Exception):
    """The step could not finish because a device of its group is gone (or the run is stopping)."""


class StaleEpoch(StepAbandoned):
    """A message or a collective call from an epoch that has ended: its sender was fenced out."""


class WaitStalled(StepAbandoned):
    """A wait saw no progress from what it waited for within its limit (`HeartbeatConfig.wait_limit_s`).

    The message names the device that waited, the device or devices it waited for, and the command
    or call it waited in: a wait never ends without saying on what."""


def stalled(device: int, waited_for: Sequence[int], call: str, epoch: int, limit_s: float) -> WaitStalled:
    """The one wording of a collective's wait that ended at its limit."""
    others = ", ".join(f"Device-{d}" for d in waited_for) or "no one"
    return WaitStalled(f"Device-{device} waited {limit_s:g} s for {others} in epoch {epoch}'s {call}: "
                       f"nothing came")


# --------------------------------------------------------------------------------------------
# What the devices and the leader are written against


class EpochCollective(Collective, Protocol):
    """The collective of one epoch's group as a device holds it: the model's calls
    (tensor_parallel_model.Collective), whose epoch and members it serves, and its end."""

    devices: tuple[int, ...]
    epoch: int
    ended_by: int | None  # the epoch that ended this one

    @property
    def aborted(self) -> bool: ...

    def abort(self) -> None:
        """Release every device waiting in a call (StepAbandoned); later calls fail at once."""

    def end(self, by_epoch: int) -> None:
        """A later epoch began: this group is gone (calls on it are refused as stale)."""


class Transport(Protocol):
    """The network as a device, the leader and the driver use it: inboxes, one collective per
    epoch, the threads of this process's devices, and the means to continue or fence a device."""

    name: str
    real_signals: bool  # faults are the process's own signals (processes), else simulated in threads
    crashed: list[tuple[str, BaseException]]

    def send(self, to: Address, envelope: Envelope) -> None: ...

    def receive(self, address: Address, timeout: float | None) -> Envelope | None: ...

    def collective(self, epoch: int, members: Sequence[int]) -> EpochCollective: ...

    def abort_epoch(self, epoch: int) -> None: ...

    def released(self, device: int) -> threading.Event: ...

    def release_hung(self) -> None: ...

    def fence(self, device: int) -> None: ...

    def processes(self) -> list[dict[str, int]]: ...

    def start_thread(self, name: str, target: Callable[[], None]) -> threading.Thread: ...

    def join(self, timeout_s: float) -> list[str]: ...


# --------------------------------------------------------------------------------------------
# What every backend's collective computes the same way


def row_split(slot: int, members: int, length: int) -> slice:
    """The rows of a `length`-row tensor that the member in `slot` holds: contiguous, in member order."""
    return slice(slot * length // members, (slot + 1) * length // members)


def sum_in_order(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parts added in member order: every backend gives the same bits."""
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


# --------------------------------------------------------------------------------------------
# What every transport keeps the same way

class EpochGroup(ABC):
    """What every backend's collective of one epoch does the same way: it serves one epoch's
    members, ends when a later epoch begins, and once ended (stale) or aborted refuses every call."""

    def __init__(self, members: Sequence[int], epoch: int):
        self.devices, self.epoch = tuple(members), epoch
        self.ended_by: int | None = None  # the epoch that ended this one

    @property
    @abstractmethod
    def aborted(self) -> bool: ...

    @abstractmethod
    def abort(self) -> None:
        """Release every device waiting in a call (StepAbandoned); later calls fail at once."""

    def end(self, by_epoch: int) -> None:
        """A later epoch began: this group is gone (calls on it are refused as stale)."""
        self.ended_by = by_epoch
        self.abort()

    def refuse_if_closed(self) -> None:
        if self.ended_by is not None:
            raise StaleEpoch(f"epoch {self.epoch}'s group has ended (epoch {self.ended_by} began): refused")
        if self.aborted:
            raise StepAbandoned(f"epoch {self.epoch} collective aborted")


G = TypeVar("G", bound=EpochCollective)


class EpochGroups(Generic[G]):
    """The registry of epoch groups and their life cycle, for any backend's collective.

    A group is made by the first member that asks for it; making the group of a later epoch ends
    every earlier one (as the survivors of a real cluster destroy the old process group); asking
    for an epoch with other members than its group's is a ValueError (a stale view of the epoch).
    """

    def __init__(self, make: Callable[[int, tuple[int, ...]], G]):
        self._make = make
        self._groups: dict[int, G] = {}
        self._lock = threading.Lock()

    def get(self, epoch: int, members: Sequence[int]) -> G:
        """The collective of `epoch`'s group (made on first use; earlier epochs' groups end)."""
        members = tuple(members)
        with self._lock:
            group = self._groups.get(epoch)
            if group is None:
                group = self._groups[epoch] = self._make(epoch, members)
                for older, old_group in self._groups.items():
                    if older < epoch and old_group.ended_by is None:
                        old_group.end(epoch)
            elif group.devices != members:
                raise ValueError(f"epoch {epoch} has members {group.devices}, not {members}")
            return group

    def abort(self, epoch: int) -> None:
        """Release whoever waits in `epoch`'s collective (a member is gone), if that group was formed."""
        with self._lock:
            group = self._groups.get(epoch)
        if group is not None:
            group.abort()


class Inboxes:
    """One queue per address, for the threads of one process (what crosses is the backend's affair)."""

    def __init__(self) -> None:
        self._queues: dict[Hashable, SimpleQueue] = {}
        self._lock = threading.Lock()

    def put(self, address: Hashable, item: Any) -> None:
        self._queue(address).put(item)

    def get(self, address: Hashable, timeout: float | None) -> Any | None:
        """The next item for `address`, or None after `timeout` seconds."""
        try:
            return self._queue(address).get(timeout=timeout)
        except Empty:
            return None

    def _queue(self, address: Hashable) -> SimpleQueue:
        with self._lock:
            return self._queues.setdefault(address, SimpleQueue())


class DeviceThreads:
    """The threads a transport runs in its process, and the events that continue a hung device.

    An error that escapes a thread is kept (`crashed`), so that it is never lost: the driver's close
    raises it. A hung device on threads waits for its `released` event (as a stopped process waits
    for SIGCONT).
    """

    def __init__(self) -> None:
        self.crashed: list[tuple[str, BaseException]] = []  # (thread, the error that ended it)
        self._threads: list[threading.Thread] = []
        self._released: dict[int, threading.Event] = {}
        self._threads_lock = threading.Lock()

    def start_thread(self, name: str, target: Callable[[], None]) -> threading.Thread:
        """A device's thread (joined by `join`); an error that escapes it is kept in `crashed`."""
        thread = self.keeping_errors(name, target)
        with self._threads_lock:
            self._threads.append(thread)
        thread.start()
        return thread

    def keeping_errors(self, name: str, target: Callable[[], None]) -> threading.Thread:
        """A daemon thread (not started) running `target`; an error that escapes it is kept, then re-raised."""
        def run() -> None:
            try:
                target()
            except BaseException as error:
                with self._threads_lock:
                    self.crashed.append((name, error))
                raise

        return threading.Thread(target=run, name=name, daemon=True)

    def join(self, timeout_s: float) -> list[str]:
        """Wait for every thread started by `start_thread` to end; the names of those still running."""
        deadline = time.monotonic() + timeout_s
        with self._threads_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in threads if t.is_alive()]

    def released(self, device: int) -> threading.Event:
        """The event that continues `device` when it hangs (as SIGCONT continues a stopped process)."""
        with self._threads_lock:
            return self._released.setdefault(device, threading.Event())

    def release_hung(self) -> None:
        """Continue every hung device: it resumes its stale step, which the fencing refuses."""
        with self._threads_lock:
            events = list(self._released.values())
        for event in events:
            event.set()
