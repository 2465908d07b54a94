"""Where the device processes meet and who starts them: the rendezvous (torchrun-style variables),
each node's launcher, and the checks made before anything starts (memory, GPUs, ports).

The launcher of node 0 is the driver's transport: it holds the c10d TCPStore through which
everything meets (each process's inbox address, each device's setup and PID, each epoch's
members), publishes every device's setup, and starts its node's device processes (`python -m
device_processes --device N`). Another host's launcher (`python device_processes.py`, `serve_node`)
starts that node's. Every launcher watches its processes exit (a signal of death), continues
stopped ones, and kills any that outlive the run. It is not a device and no scenario kills it.
"""
from __future__ import annotations

import datetime
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from device_network import POLL_S
from device_protocol import DRIVER, Address, Declare, DeviceExited, Envelope
from process_collective import collective_timeout_s
from process_network import ProcessTransport, connect_store

ESTIMATED_PROCESS_OVERHEAD = 400 * 2**20  # an interpreter with torch loaded (an estimate, for the memory check)
STARTED_PIDS: list[int] = []  # every device process this process started (the tests check none is left)


class LaunchError(RuntimeError):
    """The device processes cannot be started as asked (a port in use, no master, too little memory)."""



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
        self._processes: dict[int, subprocess.Popen] = {}  # this node's device processes
        self._cluster: tuple[int, ...] = ()  # every device, on every node: who hears of an exit
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
        self.start_here(here, devices, accelerator)

    def start_here(self, devices: Sequence[int], cluster: Sequence[int], accelerator: str = "cpu") -> None:
        """Start this node's `devices` of the `cluster`'s (with `accelerator` "cuda": one GPU each), and
        watch them."""
        if accelerator == "cuda":
            check_gpus_for(len(devices))
        self._cluster = tuple(cluster)
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
        """A device process that ends while the cluster runs is a signal: tell every device of the
        cluster, on every node (their leader, wherever it runs, declares it at once), and the driver.
        (Polled: a few system calls every 10 ms.)"""
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
        # This node's devices first: a send to a host that no longer answers can wait out its timeout.
        for other in sorted(self._cluster, key=lambda d: d not in self._processes):
            if other != device and other not in self.exits:
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
        launcher.start_here(here, devices, accelerator)
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
    runs device_processes.py, which imports only what a device needs."""
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
