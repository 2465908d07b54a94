"""The collective between device processes (torch.distributed, gloo): the same bits as the thread
backend's, uneven splits, and what a SIGKILLed member does to the others' next call; the inboxes
over TCP: what a broken connection or a bad frame does."""
from __future__ import annotations

import faulthandler
import io
import os
import pickle
import signal
import socket
import time
from datetime import timedelta
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from device_processes import FRAME, DistributedCollective, ProcessTransport
from device_protocol import Address, Envelope
from device_threads import StepAbandoned, ThreadCollective
from polling import wait_until

ROWS, WIDTH = 10, 6  # 10 rows split over 3 or 4 members: uneven


def member_input(device: int) -> torch.Tensor:
    return torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(device))


def exercise(collective, device: int, members: tuple[int, ...], store) -> dict[str, Any]:
    """Every call of the Collective once, as a device would make them."""
    x = member_input(device)
    i = members.index(device)
    collective.send(device, members[(i + 1) % len(members)], ("kv", [x[:2].clone()], device))  # the ring
    results = {"all_reduce": collective.all_reduce(device, x),
               "reduce_scatter": collective.reduce_scatter(device, x),
               "all_gather_rows": collective.all_gather_rows(device, x[collective.own_rows(device, ROWS)].clone(),
                                                             ROWS),
               "all_gather": collective.all_gather(device, x),
               "recv": collective.recv(device, members[i - 1])}
    collective.flush()  # a process's sends must be taken before it may end
    return results


def as_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def in_process(port: int, device: int, members: tuple[int, ...], epoch: int, work: Callable, results) -> None:
    faulthandler.dump_traceback_later(90, exit=True)  # a member stuck past the test's patience says where
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    collective = DistributedCollective(store, epoch, members, device, timeout_s=60.0)
    results.put((device, as_bytes(work(collective, device, members, store))))  # bytes: the process may end first


def run_processes(members: tuple[int, ...], work: Callable, answering: int | None = None) -> dict[int, Any]:
    """`work` in one spawned process per member, through a store held here (as the launcher holds it);
    the answers of the `answering` members that give one (all by default)."""
    context = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    results = context.Queue()
    processes = [context.Process(target=in_process, args=(store.port, d, members, 0, work, results))
                 for d in members]
    for process in processes:
        process.start()
    try:
        return {device: torch.load(io.BytesIO(data), weights_only=False)
                for device, data in (results.get(timeout=120) for _ in range(answering or len(members)))}
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def run_threads(members: tuple[int, ...]) -> dict[int, Any]:
    import threading
    collective, results = ThreadCollective(members, epoch=0), {}

    def run(device: int) -> None:
        results[device] = exercise(collective, device, members, None)
    threads = [threading.Thread(target=run, args=(d,)) for d in members]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("members", [(0, 1, 2), (0, 2, 3, 5)], ids=["3", "4-with-gaps"])
def test_every_call_gives_the_thread_backends_bits_over_uneven_splits(members):
    processes, threads = run_processes(members, exercise), run_threads(members)
    for device in members:
        got, want = processes[device], threads[device]
        for name in ("all_reduce", "reduce_scatter", "all_gather_rows"):
            assert torch.equal(got[name], want[name]), (device, name)
        assert all(torch.equal(a, b) for a, b in zip(got["all_gather"], want["all_gather"]))
        tag, (rows,), sender = got["recv"]
        assert (tag, sender) == ("kv", want["recv"][2]) and torch.equal(rows, want["recv"][1][0])


def lose_the_last_member(collective, device: int, members: tuple[int, ...], store) -> dict[str, Any]:
    """One all-reduce together; then the last member is SIGKILLed, and the others' next all-reduce
    fails; they form the next epoch's group among themselves and sum again."""
    x = member_input(device)
    collective.all_reduce(device, x)
    if device == members[-1]:
        os.kill(os.getpid(), signal.SIGKILL)
    started = time.perf_counter()
    try:
        collective.all_reduce(device, x)
        error = None
    except StepAbandoned as abandoned:
        error = str(abandoned)
    failed_after = time.perf_counter() - started
    started = time.perf_counter()
    survivors = members[:-1]
    regrouped = DistributedCollective(store, 1, survivors, device, timeout_s=60.0)
    formed_in = time.perf_counter() - started
    return {"error": error, "failed_after_s": failed_after, "formed_in_s": formed_in,
            "sum": regrouped.all_reduce(device, x)}


def test_a_sigkilled_member_fails_the_others_next_call_and_the_survivors_form_the_next_epoch():
    members = (0, 1, 2, 3)
    answers = run_processes(members, lose_the_last_member, answering=3)
    expected = member_input(0) + member_input(1) + member_input(2)
    for device in (0, 1, 2):
        answer = answers[device]
        assert answer["error"] is not None and "epoch 0" in answer["error"], answer
        assert answer["failed_after_s"] < 10.0, "a dead peer is known at once by all, not at the 60 s timeout"
        assert torch.equal(answer["sum"], expected)


@pytest.mark.parametrize("kind", [RuntimeError, ValueError], ids=["torch-error", "any-error"])
def test_what_stopped_a_group_forming_is_raised_by_every_call_on_it_with_its_cause(kind):
    """Not a bare 'could not be formed': the device's answer, and the leader, say why."""
    stop = kind("the store at 127.0.0.1:1 refused the connection\n(torch's detail)")

    def store_out_of_reach() -> dist.Store:
        raise stop

    collective = DistributedCollective(store_out_of_reach, 3, (0, 1), 0, timeout_s=1.0)
    for call in (lambda: collective.all_reduce(0, torch.ones(2)), lambda: collective.recv(0, 1)):
        with pytest.raises(StepAbandoned) as failure:
            call()
        assert str(failure.value) == (f"epoch 3 collective: the group could not be formed ({kind.__name__}: "
                                      f"the store at 127.0.0.1:1 refused the connection)")
        assert failure.value.__cause__ is stop


# --------------------------------------------------------------------------------------------
# The inboxes over TCP: a live peer gets what is sent, and a reader's crash is kept


@pytest.fixture
def two_transports():
    """Device-0's and Device-1's sides of the network, in this process, meeting through a store."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    transports = [ProcessTransport(("127.0.0.1", store.port), device, collective_timeout=5.0) for device in (0, 1)]
    yield transports
    for transport in transports:
        transport.close_network()


def test_a_message_to_a_live_peer_whose_connection_broke_goes_on_a_fresh_one(two_transports):
    sender, receiver = two_transports
    inbox = Address("control", 1)
    sender.send(inbox, Envelope(0, 0, 1, "first"))
    assert receiver.receive(inbox, timeout=5.0).body == "first"
    sender._peers[1][0].shutdown(socket.SHUT_WR)  # the kept connection broke; the peer lives
    sender.send(inbox, Envelope(0, 0, 2, "second"))
    got = receiver.receive(inbox, timeout=5.0)
    assert got is not None, "the message was lost although its peer lives"
    assert got.body == "second"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash is the point
def test_a_reader_that_crashes_on_a_frame_is_kept_for_close(two_transports):
    _, receiver = two_transports
    with socket.create_connection(receiver._address(1), timeout=5.0) as connection:
        garbage = b"not a pickled message"
        connection.sendall(FRAME.pack(len(garbage)) + garbage)
        assert wait_until(lambda: receiver.crashed, timeout_s=5.0), "the reader's crash was lost"
    ((thread, error),) = receiver.crashed
    assert thread == "Device-1-reader" and isinstance(error, pickle.UnpicklingError)
