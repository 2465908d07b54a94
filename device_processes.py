"""The processes backend's command line: `python device_processes.py` starts another host's devices
(a launcher for node 1, 2, ...), and `python -m device_processes --device N` is one device process
(what a launcher starts): a DeviceActor on a ProcessTransport.

The backend's parts, each a module of its own: process_collective.py (the epoch's group on
torch.distributed: gloo between CPUs, NCCL between GPUs), process_network.py (a process's inboxes
over TCP and its epochs' groups), process_launcher.py (the rendezvous, the launchers, the checks
before anything starts). Faults are real: an injected crash is the device's own SIGKILL, a hang
its own SIGSTOP (continued by SIGCONT from its launcher). This module answers --help and a
mistake before torch is imported.
"""
from __future__ import annotations

import argparse
import os
import pickle
import signal
import socket
import sys
from typing import Sequence


def node_arguments() -> argparse.ArgumentParser:
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

from process_collective import collective_timeout_s  # noqa: E402
from process_launcher import LaunchError, Rendezvous, serve_node  # noqa: E402
from process_network import ProcessTransport, connect_store  # noqa: E402



def run_device(master: tuple[str, int], device: int, node_addr: str) -> None:
    """The body of a device process: read its setup from the store, serve as a DeviceActor until it
    stops (or its launcher is gone), then end without waiting for groups left behind."""
    from device_actor import DeviceActor
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to act on: it stops every device
    launcher = os.getppid()
    store = connect_store(master)
    setup = pickle.loads(store.get(f"setup/{device}"))
    transport = ProcessTransport(master, device, collective_timeout_s(setup.heartbeat.timeout_s), node_addr,
                                 setup.placement, wait_limit_s=setup.heartbeat.call_limit_s)
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
