"""The processes backend: each device an OS process, messages over TCP, collectives on torch.distributed.

The launcher (the driver's process, as `torchrun`'s agent) holds the c10d TCPStore through which
everything meets: each process's inbox address, each device's setup and PID, each epoch's members.
It is not a device and no scenario kills it. Each device process runs the same DeviceActor as the
thread backend (device_actor.py); only its transport differs:

- Inboxes: a process listens on a TCP port of its own; a message is a pickled (Address, Envelope)
  frame on a connection kept per destination. A message to a process that is gone is lost, as on
  a network (the leader's bounded waits and the heartbeats take care of it).
- Collectives: one group per epoch (`DistributedCollective`), formed in the background under the
  epoch's own key prefix, so that the survivors form the next group without the dead device and
  without touching the old group's keys: gloo between CPU devices, NCCL between GPU devices
  (`--accelerator cuda`: every device process is given one GPU; the same calls, see
  `new_process_group`; written to torch's API but not run here, since no GPU was at hand).
- Faults are real: an injected crash is the device's own SIGKILL, a hang its own SIGSTOP (continued
  by SIGCONT from the launcher), a slow device a real stall.
- Detection has three signals: silence (heartbeats; the only one for a hung process), a failed
  collective (a SIGKILLed peer's connection closes: the device that saw it probes its peers' inboxes
  and declares those that refuse a connection), and the launcher seeing a device process exit.
- Fencing: the leader SIGKILLs a device it declared dead (`RecoveryPolicy.fence`), and every message
  or collective call it sent from an old epoch is refused by epoch as on threads.

Every sum a collective returns is taken by each device in member order from every member's part
(gathered, or exchanged all-to-all for a reduce-scatter), never by the library's ring, whose order
of additions depends on the group's size: processes give the thread backend's bits.
"""
from __future__ import annotations

import argparse
import datetime
import io
import math
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence



def node_arguments() -> "argparse.ArgumentParser":
    """`python device_processes.py`'s command line (torch-free: --help and mistakes answer at once)."""
    parser = argparse.ArgumentParser(description=(
        "The launcher of a node other than 0 (configured by MASTER_ADDR, MASTER_PORT, NODE_RANK, NNODES, "
        "DEVICES_PER_NODE, NODE_ADDR). With --device: one device process (what a launcher starts)."))
    parser.add_argument("--device", type=int, help="run this one device (launchers start these)")
    parser.add_argument("--master", help="with --device: the launcher's store, HOST:PORT")
    parser.add_argument("--node-addr", default="127.0.0.1", help="with --device: the address it listens on")
    parser.add_argument("--wait", type=float, default=600.0, help="seconds to wait for node 0 (default 600)")
    return parser


if __name__ == "__main__":  # a launcher or a device process: torch's C++ log lines would repeat its errors
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    node_arguments().parse_args()  # --help and a mistake are answered before torch is imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from device_protocol import DRIVER, Address, Declare, DeviceExited, Envelope
from device_threads import POLL_S, StaleEpoch, StepAbandoned, ThreadTransport, row_split, sum_in_order
from tensor_parallel_model import CPU

SEND_TAG = 7  # point-to-point messages of the Collective (KV copies), apart from any other traffic
FRAME = struct.Struct("!Q")  # the length of each message on an inbox connection
ESTIMATED_PROCESS_OVERHEAD = 400 * 2**20  # an interpreter with torch loaded (an estimate, for the memory check)
_LEFT_BEHIND: list = []  # groups abandoned with a call in flight: destroying one would wait for that call
GPU_POLL_S = 1e-4  # how often a call on a GPU is looked at (a GPU collective takes tens of microseconds)
STARTED_PIDS: list[int] = []  # every device process this process started (the tests check none is left)


class LaunchError(RuntimeError):
    """The device processes cannot be started as asked (a port in use, no master, too little memory)."""


def collective_timeout_s(heartbeat_timeout_s: float) -> float:
    """How long one collective call may wait for a peer before it fails: a backstop far past any
    step's compute (the heartbeats declare a hung peer long before, and its group is then abandoned)."""
    return max(30.0, 10 * heartbeat_timeout_s)


def connect_store(address: tuple[str, int], timeout_s: float = 60.0) -> dist.TCPStore:
    """A client of the launcher's store (one per thread that may block in it)."""
    return dist.TCPStore(address[0], address[1], is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


# --------------------------------------------------------------------------------------------
# The collective of one epoch


def collective_backend(placement: torch.device) -> str:
    """The torch.distributed backend between devices placed there: NCCL between GPUs, else gloo."""
    return "nccl" if placement.type == "cuda" else "gloo"


def new_process_group(store: dist.Store, rank: int, size: int, timeout: datetime.timedelta,
                      placement: torch.device) -> dist.ProcessGroup:
    """One epoch's group (formed once every member has joined through `store`).

    NCCL's communicator is made non-blocking and formed at once (not at the first call): a member
    that never comes then fails the forming, and `abort()` can end a call that waits for a dead peer
    (a killed GPU peer closes no connection the survivors see: NCCL waits, and it is the heartbeats
    or the launcher that tell)."""
    if collective_backend(placement) == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    options.config.blocking = False
    group = dist.ProcessGroupNCCL(store, rank, size, options)
    group.eager_connect_single_device(placement)
    return group


class DistributedCollective:
    """The Collective (tensor_parallel_model.py) between the processes of one epoch's group.

    The group is formed in the background from the moment the epoch is known (forming waits for
    every member), and each call waits in short slices, so that aborting the epoch (a member was
    declared dead, or a later epoch began) releases a waiting device at once instead of at the
    backend's timeout. A failed call (a peer's connection closed, a timeout) raises StepAbandoned
    and the device leaves the group: gloo tells only the members connected to a dead peer, and
    leaving closes this device's connections, so the failure reaches every member within tens of
    milliseconds (measured: 51-64 ms for a SIGKILLed member of four).

    Tensors cross on `placement`: the CPU (gloo) or the device's GPU (NCCL). On a GPU each call is
    polled until the GPU has done it, so that a call waiting for a dead peer can be abandoned (its
    communicator aborted) instead of stalling the device's stream behind it.
    """

    def __init__(self, store: dist.Store | Callable[[], dist.Store], epoch: int, members: Sequence[int], device: int,
                 timeout_s: float, on_broken: Callable[[], None] = lambda: None, placement: torch.device = CPU):
        self.devices, self.epoch, self.placement = tuple(members), epoch, placement
        self.ended_by: int | None = None  # the epoch that ended this one
        self._rank = self.devices.index(device)
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._on_broken = on_broken
        self._group: dist.ProcessGroup | None = None
        self._form_error: BaseException | None = None  # what stopped the group forming, for whoever waits for it
        self._formed, self._aborted = threading.Event(), threading.Event()
        self._sending: list[tuple[dist.Work, torch.Tensor]] = []  # sends in flight, their buffers kept alive
        connect = store if callable(store) else (lambda: store)
        threading.Thread(target=self._form, args=(connect,), name=f"epoch-{epoch}-forming", daemon=True).start()

    def _form(self, connect: Callable[[], dist.Store]) -> None:
        """Form the group; whatever stops it (a member that never came, a store out of reach) is kept
        and raised by every call on the group."""
        try:
            prefix = dist.PrefixStore(f"epoch-{self.epoch}/", connect())
            self._group = new_process_group(prefix, self._rank, len(self.devices), self._timeout, self.placement)
        except BaseException as error:  # noqa: BLE001 - raised to whoever waits for the group
            self._form_error = error
        finally:
            self._formed.set()

    # The calls of tensor_parallel_model.Collective

    def own_rows(self, device: int, length: int) -> slice:
        return row_split(self.devices.index(device), len(self.devices), length)

    def all_reduce(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        return sum_in_order(self.all_gather(device, tensor))

    def reduce_scatter(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        length = tensor.shape[0]
        splits = [self._rows(d, length) for d in self.devices]
        mine = splits[self._rank]
        received = tensor.new_empty((mine * len(self.devices), *tensor.shape[1:]))
        self._call(lambda group: group.alltoall_base(received, tensor.contiguous(), [mine] * len(self.devices),
                                                     splits, dist.AllToAllOptions()))
        return sum_in_order(received.split(mine))

    def all_gather_rows(self, device: int, rows: torch.Tensor, length: int) -> torch.Tensor:
        splits = [self._rows(d, length) for d in self.devices]
        padded = rows.new_zeros((max(splits), *rows.shape[1:]))
        padded[:rows.shape[0]] = rows
        return torch.cat([part[:n] for part, n in zip(self.all_gather(device, padded), splits)])

    def all_gather(self, device: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every member's tensor, whatever its shape (the logits' vocabulary rows split unevenly:
        128256 over 7 devices): the shapes first, then the values padded to the longest."""
        shape = torch.tensor(tensor.shape, dtype=torch.int64, device=self.placement)
        shapes = [torch.empty_like(shape) for _ in self.devices]
        self._call(lambda group: group.allgather([shapes], [shape]))
        sizes = [int(s.prod()) for s in shapes]
        flat = tensor.new_zeros(max(sizes))
        flat[:tensor.numel()] = tensor.reshape(-1)
        parts = [torch.empty_like(flat) for _ in self.devices]
        self._call(lambda group: group.allgather([parts], [flat]))
        return [part[:size].view(*s.tolist()) for part, size, s in zip(parts, sizes, shapes)]

    def send(self, device: int, to: int, payload: Any) -> None:
        """Start sending `payload` (its size, then its bytes) and return: a gloo send completes only
        once the receiver takes it, and every member may send before it receives (replication's ring)."""
        group = self._joined()
        self._sending = [(work, buffer) for work, buffer in self._sending if not work.is_completed()]
        data = _as_bytes(payload).to(self.placement)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.placement)
        rank = self.devices.index(to)
        self._sending += [(group.send([size], rank, SEND_TAG), size), (group.send([data], rank, SEND_TAG), data)]

    def recv(self, device: int, source: int) -> Any:
        rank, size = self.devices.index(source), torch.empty(1, dtype=torch.int64, device=self.placement)
        self._point_to_point(lambda group: group.recv([size], rank, SEND_TAG))
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.placement)
        self._point_to_point(lambda group: group.recv([data], rank, SEND_TAG))
        return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location=self.placement, weights_only=False)

    def flush(self) -> None:
        """Wait until every send started here was taken by its receiver (before this device reports a
        command done, or leaves: a process that ends with a send in flight takes the data with it)."""
        sending, self._sending = self._sending, []
        for work, _ in sending:
            self._point_to_point(lambda group, work=work: work)

    # Lifetime

    def abort(self) -> None:
        """Release this device from any call it waits in (StepAbandoned); later calls fail at once."""
        self._aborted.set()

    def end(self, by_epoch: int) -> None:
        """A later epoch began: this group is gone (calls on it are refused as stale)."""
        self.ended_by = by_epoch
        self.abort()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def _rows(self, device: int, length: int) -> int:
        rows = self.own_rows(device, length)
        return rows.stop - rows.start

    def _joined(self) -> dist.ProcessGroup:
        """The formed group, waiting for it as long as the epoch stands."""
        while not self._formed.wait(POLL_S):
            self._refuse_if_closed()
        self._refuse_if_closed()
        if self._form_error is not None:
            raise StepAbandoned(f"epoch {self.epoch} collective: the group could not be formed "
                                f"({_one_line(self._form_error)})") from self._form_error
        if self._group is None:
            raise StepAbandoned(f"epoch {self.epoch} collective: this device has left the group")
        return self._group

    def _call(self, start: Callable[[dist.ProcessGroup], dist.Work]) -> None:
        """A collective call, waited for in slices (an aborted epoch releases it at once)."""
        work = self._start(start)
        while not self._waited_slice(work):
            if self.aborted:
                self._leave(keep_alive=True)
                self._refuse_if_closed()
        self._outcome(work)

    def _waited_slice(self, work: dist.Work) -> bool:
        """Wait a slice of time for `work`: has it completed (well or not)?"""
        if self.placement.type == "cuda":
            deadline = time.monotonic() + POLL_S
            while not work.is_completed() and time.monotonic() < deadline:
                time.sleep(GPU_POLL_S)
            return work.is_completed()
        try:
            work.wait(datetime.timedelta(seconds=POLL_S))
            return True
        except RuntimeError:  # the slice ended (the call may have completed just after), or it failed
            return work.is_completed()

    def _point_to_point(self, start: Callable[[dist.ProcessGroup], dist.Work]) -> None:
        """A send or receive. On gloo it is waited for whole: gloo closes the connection when a
        point-to-point wait times out, so it cannot be waited for in slices. A dead peer fails it at
        once; a hung one is fenced by SIGKILL (which fails it too), else gloo's timeout ends it. On
        NCCL it is polled as any call (an aborted epoch aborts the communicator under it)."""
        if self.placement.type == "cuda":
            self._call(start)
        else:
            self._outcome(self._start(start))

    def _start(self, start: Callable[[dist.ProcessGroup], dist.Work]) -> dist.Work:
        group = self._joined()
        try:
            return start(group)
        except RuntimeError as error:  # the group broke before this call: a peer is gone
            self._fail(error)

    def _outcome(self, work: dist.Work) -> None:
        """A completed call's own outcome: nothing, or its failure (a peer's connection closed, or gloo's
        timeout), after which this device leaves the group and looks for the dead peer."""
        try:
            work.wait()
        except RuntimeError as error:
            self._fail(error)

    def _fail(self, error: RuntimeError) -> None:
        self._leave(keep_alive=False)
        self._on_broken()
        raise StepAbandoned(f"epoch {self.epoch} collective failed: {error}") from None

    def _leave(self, keep_alive: bool) -> None:
        """Drop the group: its connections close, which tells the other members. Destroying a gloo
        group waits for a call still in flight, so that happens on a thread of its own (or never,
        while such a call may still be waiting for a hung peer). An NCCL communicator is aborted,
        which ends the calls still in flight on the GPU."""
        group, self._group = self._group, None
        self._sending = []
        if group is not None and collective_backend(self.placement) == "nccl":
            threading.Thread(target=group.abort, name="aborting-group", daemon=True).start()
        elif group is not None and keep_alive:
            _LEFT_BEHIND.append(group)
        elif group is not None:
            holder = [group]
            threading.Thread(target=holder.clear, name="leaving-group", daemon=True).start()
            del group

    def _refuse_if_closed(self) -> None:
        if self.ended_by is not None:
            raise StaleEpoch(f"epoch {self.epoch}'s group has ended (epoch {self.ended_by} began): refused")
        if self.aborted:
            raise StepAbandoned(f"epoch {self.epoch} collective aborted")


def _one_line(error: BaseException) -> str:
    """An error's type and the first line of its message (torch's errors run to many lines)."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def _as_bytes(payload: Any) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# A process's side of the network


class ProcessTransport(ThreadTransport):
    """The inboxes of one process (a device, or the launcher) over TCP, and its epochs' groups.

    Threads inside the process (a device's compute, control and leader threads) share its queues
    as on the thread backend; between processes a message is pickled and sent. An inbox address,
    an epoch's members and a device's PID are found in the launcher's store.
    """

    real_signals = True  # an injected crash is a SIGKILL, a hang a SIGSTOP

    def __init__(self, master: tuple[str, int], me: int, collective_timeout: float, host: str = "127.0.0.1",
                 placement: torch.device = CPU):
        super().__init__()
        self.name = "processes"
        self.master, self.me, self._collective_timeout = master, me, collective_timeout
        self.placement = placement  # where this process's device computes (its collectives' tensors cross there)
        self._store = connect_store(master)  # lookups only (never a blocking wait): shared by this process's threads
        self._store_lock = threading.Lock()
        self._server = socket.create_server((host, 0))
        self._server.settimeout(POLL_S)
        self._closing = threading.Event()
        self._peers: dict[int, tuple[socket.socket, threading.Lock]] = {}
        self._addresses: dict[int, tuple[str, int]] = {}
        self._network_threads = [self._network_thread("inbox", self._accept)]
        self._store_set(f"inbox/{me}", f"{host}:{self._server.getsockname()[1]}")

    # Messages

    def send(self, to: Address, envelope: Envelope) -> None:
        if to.owner == self.me:  # this process's own threads
            self._inbox(to).put(envelope)
            return
        data = pickle.dumps((to, envelope), protocol=pickle.HIGHEST_PROTOCOL)
        frame = FRAME.pack(len(data)) + data
        for _ in range(2):  # a connection that broke while its peer lives: once more, on a fresh one
            try:
                peer = self._connection(to.owner)
                if peer is None:
                    return  # not on the network (yet): lost, as a message to an absent host is
                connection, lock = peer
                with lock:
                    connection.sendall(frame)
                return
            except socket.timeout:
                self._forget(to.owner)
                return  # the peer is stopped past the send timeout: lost (the heartbeats tell it is hung)
            except OSError:
                self._forget(to.owner)  # a frame cut short is dropped by the reader: never delivered twice
        # the peer refuses a fresh connection too: it is gone, and the message with it (its death is detected)

    def _connection(self, owner: int) -> tuple[socket.socket, threading.Lock] | None:
        with self._lock:
            peer = self._peers.get(owner)
        if peer is not None:
            return peer
        address = self._address(owner)
        if address is None:
            return None
        connection = socket.create_connection(address, timeout=self._collective_timeout)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            return self._peers.setdefault(owner, (connection, threading.Lock()))

    def _forget(self, owner: int) -> None:
        with self._lock:
            peer = self._peers.pop(owner, None)
        if peer is not None:
            peer[0].close()

    def _address(self, owner: int) -> tuple[str, int] | None:
        if owner not in self._addresses:
            value = self._store_lookup(f"inbox/{owner}")
            if value is None:
                return None
            host, port = value.rsplit(":", 1)
            self._addresses[owner] = (host, int(port))
        return self._addresses[owner]

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._server.accept()
            except (socket.timeout, OSError):
                continue
            self._network_threads.append(self._network_thread("reader", lambda c=connection: self._read(c)))

    def _read(self, connection: socket.socket) -> None:
        """Frames from one peer into this process's queues, until the peer closes (or dies)."""
        connection.settimeout(POLL_S)
        with connection:
            while not self._closing.is_set():
                header = _receive_exactly(connection, FRAME.size, self._closing)
                if header is None:
                    return
                data = _receive_exactly(connection, FRAME.unpack(header)[0], self._closing)
                if data is None:
                    return
                to, envelope = pickle.loads(data)
                self._inbox(to).put(envelope)

    def _network_thread(self, role: str, target: Callable[[], None]) -> threading.Thread:
        """A thread of the network (accepting, reading a peer, watching exits): its crash is kept too."""
        name = f"{'Launcher' if self.me <= DRIVER else f'Device-{self.me}'}-{role}"
        thread = threading.Thread(target=self._keeping_errors(name, target), name=name, daemon=True)
        thread.start()
        return thread

    # Groups

    def collective(self, epoch: int, members: Sequence[int]) -> DistributedCollective:
        """The collective of `epoch`'s group (formed in the background from now; earlier epochs' groups
        end). The members are claimed in the store: a different claim means this view is stale."""
        members = tuple(members)
        with self._lock:
            group = self._groups.get(epoch)
            if group is None:
                self._claim(epoch, members)
                group = self._groups[epoch] = DistributedCollective(
                    lambda: connect_store(self.master), epoch, members, self.me, self._collective_timeout,
                    on_broken=lambda: self._declare_unreachable(members), placement=self.placement)
                for older, old_group in self._groups.items():
                    if older < epoch and old_group.ended_by is None:
                        old_group.end(epoch)
            elif group.devices != members:
                raise ValueError(f"epoch {epoch} has members {group.devices}, not {members}")
            return group

    def _claim(self, epoch: int, members: tuple[int, ...]) -> None:
        wanted = ",".join(map(str, members))
        with self._store_lock:
            claimed = self._store.compare_set(f"members/{epoch}", "", wanted).decode()
        if claimed != wanted:
            raise ValueError(f"epoch {epoch} has members ({claimed}), not {members}")

    def _declare_unreachable(self, members: tuple[int, ...]) -> None:
        """A collective call failed: the members whose inbox refuses a connection are dead (a stopped
        process still accepts one); tell every member, whose leader declares them at once."""
        dead = [d for d in members if d != self.me and not self._reachable(d)]
        for device in dead:
            for member in members:
                if member not in dead:
                    self.send(Address("control", member), Envelope(self.me, 0, 0, Declare(device, "collective")))

    def _reachable(self, owner: int) -> bool:
        address = self._address(owner)
        try:
            socket.create_connection(address, timeout=1.0).close()
            return True
        except OSError:
            return False

    # Fencing

    def fence(self, device: int) -> None:
        """Kill a device declared dead (SIGKILL, as clusters fence a node); only on this host."""
        value = self._store_lookup(f"pid/{device}")
        if value is None:
            return
        host, pid = value.rsplit(":", 1)
        if host == socket.gethostname():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    # The store

    def _store_lookup(self, key: str) -> str | None:
        with self._store_lock:
            if not self._store.check([key]):
                return None
            return self._store.get(key).decode()

    def _store_set(self, key: str, value: str | bytes) -> None:
        with self._store_lock:
            self._store.set(key, value)

    def close_network(self) -> None:
        """Stop listening and reading; close every connection."""
        self._closing.set()
        self._server.close()
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for connection, _ in peers:
            connection.close()
        for thread in list(self._network_threads):
            thread.join(timeout=2.0)


def _receive_exactly(connection: socket.socket, size: int, closing: threading.Event) -> bytes | None:
    """`size` bytes from the connection, or None once it closes (or this process is closing)."""
    data = bytearray()
    while len(data) < size:
        if closing.is_set():
            return None
        try:
            chunk = connection.recv(size - len(data))
        except socket.timeout:
            continue
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return bytes(data)


# --------------------------------------------------------------------------------------------
# Where the processes meet, and who starts them


@dataclass(frozen=True)
class Rendezvous:
    """Where the launcher's store listens and which devices this node runs, in the torchrun style.

    On one machine everything is on loopback with a free port. Over several machines, every node
    sets MASTER_ADDR and MASTER_PORT (node 0's store), NODE_RANK, NNODES, DEVICES_PER_NODE
    (default: the devices split evenly) and NODE_ADDR (the address its devices listen on).
    """

    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: any free port (one machine only)
    node_rank: int = 0
    nodes: int = 1
    devices_per_node: int | None = None
    node_addr: str = "127.0.0.1"

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "Rendezvous":
        def number(name: str, default: int | None) -> int | None:
            value = environ.get(name)
            if value is None:
                return default
            try:
                return int(value)
            except ValueError:
                raise LaunchError(f"{name}={value!r} is not a whole number") from None

        return cls(environ.get("MASTER_ADDR", "127.0.0.1"), number("MASTER_PORT", 0), number("NODE_RANK", 0),
                   number("NNODES", 1), number("DEVICES_PER_NODE", None), environ.get("NODE_ADDR", "127.0.0.1"))

    def devices_here(self, devices: Sequence[int]) -> list[int]:
        """The devices this node runs: contiguous blocks of `devices_per_node`, node 0 first."""
        per_node = self.devices_per_node or math.ceil(len(devices) / self.nodes)
        return list(devices)[self.node_rank * per_node:(self.node_rank + 1) * per_node]


class ProcessLauncher(ProcessTransport):
    """A node's launcher. On node 0 it is the driver's side: it holds the store and publishes every
    device's setup. On every node it starts that node's device processes, watches them exit,
    continues stopped ones, and at the end waits for them all, killing any that linger."""

    def __init__(self, rendezvous: Rendezvous, collective_timeout: float, wait_for_master_s: float = 60.0):
        self.rendezvous = rendezvous
        if rendezvous.node_rank == 0:
            self.store = open_master_store(rendezvous)
            master, me = (rendezvous.master_addr, self.store.port), DRIVER
        else:
            self.store = reach_master_store(rendezvous, wait_for_master_s)
            master, me = (rendezvous.master_addr, rendezvous.master_port), DRIVER - rendezvous.node_rank
        super().__init__(master, me, collective_timeout, rendezvous.node_addr)
        self._processes: dict[int, subprocess.Popen] = {}
        self.exits: dict[int, tuple[float, int]] = {}  # device -> (clock time, exit code)
        self._stopping = threading.Event()

    def launch(self, setups: Sequence[Any], per_process_bytes: int) -> None:
        """Publish every device's setup; start this node's devices (other nodes start theirs)."""
        devices, accelerator = [setup.device for setup in setups], setups[0].accelerator
        here = self.rendezvous.devices_here(devices)
        check_memory_for(len(here), 0 if accelerator == "cuda" else per_process_bytes)
        for setup in setups:
            self._store_set(f"setup/{setup.device}", pickle.dumps(setup))
        self._store_set("accelerator", accelerator)
        self._store_set("devices", ",".join(map(str, devices)))
        self.start_here(here, accelerator)

    def start_here(self, devices: Sequence[int], accelerator: str = "cpu") -> None:
        """Start this node's device processes (with `accelerator` "cuda": one GPU each), and watch them."""
        if accelerator == "cuda":
            check_gpus_for(len(devices))
        self._network_threads.append(self._network_thread("exits", self._watch_exits))
        start_device_processes(self.master, devices, self.rendezvous.node_addr, self._processes, accelerator)

    def processes(self) -> list[dict[str, int]]:
        """Every live device process of this node: device, PID, resident and peak memory (bytes)."""
        entries = []
        for device, process in sorted(self._processes.items()):
            memory = process_memory(process.pid)
            if process.returncode is None and memory is not None:
                entries.append({"device": device, "pid": process.pid, "rss_bytes": memory[0],
                                "peak_rss_bytes": memory[1]})
        return entries

    def pids(self) -> dict[int, int]:
        return {device: process.pid for device, process in self._processes.items()}

    def release_hung(self) -> None:
        """SIGCONT every device process (a stopped one goes on; the others ignore it)."""
        for process in self._processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGCONT)

    def _watch_exits(self) -> None:
        """A device process that ends while the cluster runs is a signal: tell the devices (their
        leader declares it at once) and the driver. (Polled: a few system calls every 10 ms.)"""
        while not self._closing.is_set():
            for device, process in list(self._processes.items()):
                if device not in self.exits and process.poll() is not None:
                    self._exited(device, process.returncode)
            time.sleep(POLL_S / 5)

    def _exited(self, device: int, code: int) -> None:
        self.exits[device] = (time.monotonic(), code)
        if code not in (0, -signal.SIGKILL, -signal.SIGTERM):
            self.crashed.append((f"Device-{device}", RuntimeError(f"its process exited with code {code} "
                                                                  f"(its stderr says why)")))
        if self._stopping.is_set():
            return
        self.send(Address("driver", DRIVER), Envelope(DRIVER, 0, 0, DeviceExited(device, code, self.exits[device][0])))
        for other in self._processes:
            if other not in self.exits:
                self.send(Address("control", other), Envelope(DRIVER, 0, 0, Declare(device, "process-exit")))

    def join(self, timeout_s: float) -> list[str]:
        """Wait for every device process to end (the exits watcher reaps them); kill those that do not
        in time (no orphans). The names of those that had to be killed, and of threads left here."""
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        lingering = [] if self.await_exits(timeout_s) else [
            f"Device-{d} (pid {p.pid})" for d, p in self._processes.items() if d not in self.exits]
        if lingering:
            for device, process in self._processes.items():
                if device not in self.exits:
                    process.kill()
            self.await_exits(5.0)
        self.close_network()
        return lingering + super().join(max(0.0, deadline - time.monotonic()))

    def await_exits(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while len(self.exits) < len(self._processes):
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S / 5)
        return True


def driver_launcher(rendezvous: Rendezvous, collective_timeout: float) -> ProcessLauncher:
    """The driver's launcher: node 0's, holding the store."""
    if rendezvous.node_rank != 0:
        raise LaunchError(f"the driver runs on node 0 (NODE_RANK={rendezvous.node_rank}); other nodes run "
                          f"`python device_processes.py`")
    return ProcessLauncher(rendezvous, collective_timeout)


def open_master_store(rendezvous: Rendezvous) -> dist.TCPStore:
    """The launcher's store; a port in use or an address not of this machine is a one-line error."""
    try:
        return dist.TCPStore(rendezvous.master_addr, rendezvous.master_port, is_master=True, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=60))
    except (RuntimeError, OSError) as error:
        reason = "in use" if "in use" in str(error).lower() else "not available"
        raise LaunchError(f"cannot hold the store at {rendezvous.master_addr}:{rendezvous.master_port}: "
                          f"the port is {reason} ({str(error).splitlines()[0]})") from None


def reach_master_store(rendezvous: Rendezvous, wait_s: float) -> dist.TCPStore:
    """Another node's connection to node 0's store; a master that does not answer is a one-line error."""
    try:
        return connect_store((rendezvous.master_addr, rendezvous.master_port), timeout_s=wait_s)
    except (RuntimeError, OSError) as error:
        raise LaunchError(f"cannot reach the store at {rendezvous.master_addr}:{rendezvous.master_port} within "
                          f"{wait_s:g} s ({str(error).splitlines()[0]})") from None


def serve_node(rendezvous: Rendezvous, wait_for_master_s: float) -> int:
    """Another host's launcher (`python device_processes.py` with NODE_RANK >= 1): wait for node 0 to
    publish the devices, start this node's, and end when they have all ended (Ctrl-C or SIGTERM
    kills them). The exit status: 0, or 1 if a device process ended with an unexpected error."""
    if rendezvous.node_rank == 0:
        raise LaunchError("node 0 runs the driver (the demo, or TensorParallelLlama.load); start other nodes "
                          "with NODE_RANK=1, 2, ...")
    if not rendezvous.master_port:
        raise LaunchError("MASTER_PORT must name node 0's store port on every other node")
    launcher = ProcessLauncher(rendezvous, collective_timeout_s(0.0), wait_for_master_s)
    waiting = connect_store(launcher.master, timeout_s=wait_for_master_s)  # blocks until node 0 publishes
    try:
        devices = [int(d) for d in waiting.get("devices").decode().split(",")]
        accelerator = waiting.get("accelerator").decode()
    except (RuntimeError, OSError):
        raise LaunchError(f"node 0 published no devices within {wait_for_master_s:g} s") from None
    here = rendezvous.devices_here(devices)
    if not here:
        raise LaunchError(f"node {rendezvous.node_rank} has no devices ({len(devices)} devices, "
                          f"{rendezvous.devices_per_node or 'an even split'} per node)")
    print(f"node {rendezvous.node_rank}: devices {', '.join(map(str, here))}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        launcher.start_here(here, accelerator)
        while not launcher.await_exits(1.0):
            waiting.check(["devices"])  # raises once node 0's store is gone: its driver died
    except (RuntimeError, OSError):
        print(f"node {rendezvous.node_rank}: node 0 is gone: killing its devices", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"node {rendezvous.node_rank}: interrupted: killing its devices", file=sys.stderr)
    finally:
        launcher.join(0.0)  # the devices have ended; any left (interrupted) are killed
    return 1 if launcher.crashed else 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def check_memory_for(processes: int, per_process_bytes: int) -> None:
    """Refuse a device count this host cannot hold in memory (an estimate: torch's own footprint
    plus each process's slices), before anything is started."""
    available = _meminfo_bytes("MemAvailable")
    needed = processes * (ESTIMATED_PROCESS_OVERHEAD + per_process_bytes)
    if available is not None and needed > available:
        raise LaunchError(f"{processes} device processes need about {needed / 2**30:.1f} GiB (estimate), and this "
                          f"host has {available / 2**30:.1f} GiB available")


def start_device_processes(master: tuple[str, int], devices: Sequence[int], node_addr: str,
                           processes: dict[int, subprocess.Popen], accelerator: str = "cpu") -> None:
    """Start one process per device into `processes` (each entered as soon as it starts, so that a
    failure half-way still leaves every started process known, to be stopped). A device process
    runs this module, which imports only what a device needs."""
    here = str(Path(__file__).resolve().parent)
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    for local_index, device in enumerate(devices):
        command = [sys.executable, "-m", "device_processes", "--device", str(device),
                   "--master", f"{master[0]}:{master[1]}", "--node-addr", node_addr]
        own = gpu_environment(environment, local_index) if accelerator == "cuda" else environment
        # a session of its own: a terminal's Ctrl-C reaches the launcher only, which stops every device
        processes[device] = subprocess.Popen(command, env=own, stdin=subprocess.DEVNULL, start_new_session=True)
        STARTED_PIDS.append(processes[device].pid)


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The GPUs this node may use: those CUDA_VISIBLE_DEVICES names, else every GPU torch sees."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu for gpu in listed.split(",") if gpu.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def check_gpus_for(processes: int) -> None:
    """Refuse `--accelerator cuda` where this node has no GPU for every one of its device processes."""
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
        raise LaunchError(f"--accelerator cuda needs a GPU per device process; torch {torch.__version__} here is "
                          f"{build}")
    gpus = visible_gpus()
    if len(gpus) < processes:
        raise LaunchError(f"{processes} device processes on this node need {processes} GPUs (NCCL takes one GPU per "
                          f"process); it has {len(gpus)}")


def gpu_environment(environment: Mapping[str, str], local_index: int) -> dict[str, str]:
    """A device process's environment with one GPU of its own (the `local_index`-th visible one; it
    is that process's cuda:0), and NCCL's watchdog told not to end the process on a failed call:
    the devices' heartbeats declare the dead peer and the survivors abort that epoch's communicator."""
    own = dict(environment, CUDA_VISIBLE_DEVICES=visible_gpus(environment)[local_index])
    own.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    return own


def process_exists(pid: int) -> bool:
    """Is there a process with this PID on this host (one that ended but was not reaped counts)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def process_memory(pid: int) -> tuple[int, int] | None:
    """(resident, peak resident) bytes of a process of this host, from /proc (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):
        return None


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------------------------
# A device process


def run_device(master: tuple[str, int], device: int, node_addr: str) -> None:
    """The body of a device process: read its setup from the store, serve as a DeviceActor until it
    stops (or its launcher is gone), then end without waiting for groups left behind."""
    from device_actor import DeviceActor
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to act on: it stops every device
    launcher = os.getppid()
    store = connect_store(master)
    setup = pickle.loads(store.get(f"setup/{device}"))
    transport = ProcessTransport(master, device, collective_timeout_s(setup.heartbeat.timeout_s), node_addr,
                                 setup.placement)
    store.set(f"pid/{device}", f"{socket.gethostname()}:{os.getpid()}")
    DeviceActor(setup, transport).start()
    while transport.join(timeout_s=0.5):
        if os.getppid() != launcher:  # the launcher died: no orphan outlives it
            break
    transport.close_network()
    for name, error in transport.crashed:
        print(f"{name} ended with an unexpected error: {error!r}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(3 if transport.crashed else 0)  # no finalisers: a group left behind may still wait for a hung peer


def main(argv: Sequence[str] | None = None) -> int:
    """`python device_processes.py`: the launcher of a node other than 0 (configured by MASTER_ADDR,
    MASTER_PORT, NODE_RANK, NNODES, DEVICES_PER_NODE, NODE_ADDR). With --device: one device process
    (what a launcher starts)."""
    args = node_arguments().parse_args(argv)
    if args.device is not None:
        host, port = args.master.rsplit(":", 1)
        run_device((host, int(port)), args.device, args.node_addr)
    try:
        return serve_node(Rendezvous.from_environment(), args.wait)
    except LaunchError as bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
