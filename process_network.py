"""A process's side of the processes backend's network: its inboxes over TCP, and its epochs' groups.

A process (a device, or a launcher) listens on a TCP port of its own; a message is a pickled
(Address, Envelope) frame on a connection kept per destination. A message to a process that is
gone is lost, as on a network (the leader's bounded waits and the heartbeats take care of it).
Inbox addresses, each epoch's members and each device's PID are found in the launcher's c10d
store. A failed collective probes the peers' inboxes: those that refuse a connection are dead.
"""
from __future__ import annotations

import datetime
import os
import pickle
import signal
import socket
import struct
import threading
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from device_network import POLL_S, WAIT_LIMIT_S, DeviceThreads, EpochGroups, Inboxes
from device_protocol import DRIVER, Address, Declare, Envelope
from process_collective import DistributedCollective
from tensor_parallel_model import CPU

FRAME = struct.Struct("!Q")  # the length of each message on an inbox connection


def connect_store(address: tuple[str, int], timeout_s: float = 60.0) -> dist.TCPStore:
    """A client of the launcher's store (one per thread that may block in it)."""
    return dist.TCPStore(address[0], address[1], is_master=False, timeout=datetime.timedelta(seconds=timeout_s))



class ProcessTransport(DeviceThreads):
    """The inboxes of one process (a device, or the launcher) over TCP, and its epochs' groups.

    Threads inside the process (a device's compute, control and leader threads) share its queues
    (device_network.Inboxes); between processes a message is pickled and sent. An inbox address,
    an epoch's members and a device's PID are found in the launcher's store.
    """

    name = "processes"
    real_signals = True  # an injected crash is a SIGKILL, a hang a SIGSTOP

    def __init__(self, master: tuple[str, int], me: int, collective_timeout: float, host: str = "127.0.0.1",
                 placement: torch.device = CPU, wait_limit_s: float = WAIT_LIMIT_S):
        super().__init__()
        self.master, self.me, self._collective_timeout = master, me, collective_timeout
        self.placement = placement  # where this process's device computes (its collectives' tensors cross there)
        self._inboxes = Inboxes()
        self._groups = EpochGroups(lambda epoch, members: self._new_group(epoch, members, wait_limit_s))
        self._lock = threading.Lock()
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
            self._inboxes.put(to, envelope)
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
                self._inboxes.put(to, envelope)

    def _network_thread(self, role: str, target: Callable[[], None]) -> threading.Thread:
        """A thread of the network (accepting, reading a peer, watching exits): its crash is kept too."""
        name = f"{'Launcher' if self.me <= DRIVER else f'Device-{self.me}'}-{role}"
        thread = self.keeping_errors(name, target)
        thread.start()
        return thread

    def receive(self, address: Address, timeout: float | None) -> Envelope | None:
        """The next envelope in `address`'s inbox (of this process), or None after `timeout` seconds."""
        return self._inboxes.get(address, timeout)

    # Groups

    def collective(self, epoch: int, members: Sequence[int]) -> DistributedCollective:
        """The collective of `epoch`'s group (formed in the background from now; earlier epochs' groups
        end: device_network.EpochGroups)."""
        return self._groups.get(epoch, members)

    def abort_epoch(self, epoch: int) -> None:
        """Release whoever waits in `epoch`'s collective (a member is gone), if that group was formed."""
        self._groups.abort(epoch)

    def _new_group(self, epoch: int, members: tuple[int, ...], wait_limit_s: float) -> DistributedCollective:
        """`epoch`'s group, once its members are claimed in the store: a different claim means this
        view is stale."""
        self._claim(epoch, members)
        return DistributedCollective(lambda: connect_store(self.master), epoch, members, self.me,
                                     self._collective_timeout, on_broken=lambda: self._declare_unreachable(members),
                                     placement=self.placement, wait_limit_s=wait_limit_s)

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

    def processes(self) -> list[dict[str, int]]:
        """None started here: a device process starts no other (a launcher lists those it started)."""
        return []

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
