"""The layers the right way up: the leader and the devices are written against device_network.py
alone, never against a backend; the two backends share what they share through it, neither
through the other; and each backend module stays small enough to read whole."""
from __future__ import annotations

import ast
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from device_network import DeviceThreads, Transport
from device_threads import ThreadTransport
from process_network import ProcessTransport

REPO = Path(__file__).resolve().parent.parent
BACKEND_MODULES = {"device_threads", "device_processes", "process_collective", "process_network", "process_launcher"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (a function's own imports too)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            modules.add(node.module.split(".")[0])
    return modules


@pytest.mark.parametrize("module", ["cluster_leader.py", "device_actor.py"])
def test_the_leader_and_the_devices_import_no_backend(module):
    assert imported_modules(REPO / module) & BACKEND_MODULES == set()
    assert "device_network" in imported_modules(REPO / module)


def test_the_processes_transport_is_no_thread_transport_and_both_keep_threads_the_same_way():
    assert not issubclass(ProcessTransport, ThreadTransport)
    assert issubclass(ProcessTransport, DeviceThreads) and issubclass(ThreadTransport, DeviceThreads)


@pytest.fixture
def process_transport():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    transport = ProcessTransport(("127.0.0.1", store.port), 0, collective_timeout=5.0)
    yield transport
    transport.close_network()


def test_both_transports_provide_every_member_of_the_transport_protocol(process_transport):
    members = set(Transport.__annotations__) | {name for name in vars(Transport) if not name.startswith("_")}
    for transport in (ThreadTransport(), process_transport):
        assert [name for name in sorted(members) if not hasattr(transport, name)] == [], type(transport).__name__


@pytest.mark.parametrize("module", sorted(BACKEND_MODULES | {"device_network"}))
def test_every_backend_module_can_be_read_whole(module):
    assert len((REPO / f"{module}.py").read_text().splitlines()) <= 400
