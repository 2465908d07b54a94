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
import threading
import time
from datetime import timedelta
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from device_network import StepAbandoned, WaitStalled
from device_protocol import Address, Envelope
from device_threads import ThreadCollective
from on_threads import on_threads
from polling import wait_until
from process_collective import DistributedCollective
from process_network import FRAME, ProcessTransport

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
    collective = ThreadCollective(members, epoch=0)
    return on_threads(members, lambda device: exercise(collective, device, members, None))


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


# --------------------------------------------------------------------------------------------
# Every wait ends: a call whose peer never takes part ends at the wait limit, saying on whom


LIMIT_S = 0.3


def in_one_group(members: tuple[int, ...], work: Callable[[DistributedCollective, int], Any],
                 wait_limit_s: float = LIMIT_S, epoch: int = 0) -> dict[int, Any]:
    """`work(collective, device)` on one thread per member of one real gloo group (formed through a
    store held here), each member's result or exception; a member's collective lives until every
    member's work has ended (a peer that left would fail the call at once instead of wedging it)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))

    def connect() -> dist.Store:  # a client of its own for each member: forming blocks in the store
        return dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=30))

    collectives = {d: DistributedCollective(connect, epoch, members, d, timeout_s=30.0, wait_limit_s=wait_limit_s)
                   for d in members}
    return on_threads(members, lambda device: work(collectives[device], device))


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """What `call` raised (or returned), and how long it took."""
    started = time.monotonic()
    try:
        outcome = call()
    except Exception as error:  # noqa: BLE001 - handed back to the test
        outcome = error
    return outcome, time.monotonic() - started


def wedged(collective: DistributedCollective, device: int) -> str:
    """A member that formed the group and then never takes part (as a SIGSTOPped process)."""
    return "wedged"


@pytest.mark.parametrize("call", ["all_reduce", "all_gather_rows", "recv", "flush"])
def test_a_wait_on_a_peer_that_never_takes_part_ends_at_the_wait_limit_saying_on_whom(call):
    x = member_input(0)
    calls = {"all_reduce": lambda c: c.all_reduce(0, x), "all_gather_rows": lambda c: c.all_gather_rows(0, x[:5], ROWS),
             "recv": lambda c: c.recv(0, 1), "flush": lambda c: (c.send(0, 1, ("kv", x)), c.flush())}
    results = in_one_group((0, 1), lambda c, d: timed(lambda: calls[call](c)) if d == 0 else wedged(c, d))
    error, waited = results[0]
    assert isinstance(error, WaitStalled), error
    assert str(error) == f"Device-0 waited 0.3 s for Device-1 in epoch 0's {call}: nothing came"
    assert LIMIT_S <= waited < LIMIT_S + 5.0


def test_an_abort_still_releases_a_waiting_collective_call_at_once():
    def reduce_until_aborted(collective: DistributedCollective, device: int):
        if device == 1:
            return wedged(collective, device)
        threading.Timer(0.2, collective.abort).start()
        return timed(lambda: collective.all_reduce(0, torch.ones(2)))

    error, waited = in_one_group((0, 1), reduce_until_aborted, wait_limit_s=30.0)[0]
    assert type(error) is StepAbandoned and "aborted" in str(error) and waited < 5.0


# --------------------------------------------------------------------------------------------
# One gloo call per sum: where the shapes are known in advance, nothing else crosses first


def test_an_all_reduce_and_an_all_gather_of_rows_are_one_gloo_call_each(monkeypatch):
    made: list[str] = []
    real_call = DistributedCollective._call
    monkeypatch.setattr(DistributedCollective, "_call",
                        lambda self, call, *rest: (made.append(call) if self._device == 0 else None,
                                                   real_call(self, call, *rest))[1])

    def every_sum(collective: DistributedCollective, device: int) -> None:
        x = member_input(device)
        collective.all_reduce(device, x)
        collective.reduce_scatter(device, x)
        collective.all_gather_rows(device, x[collective.own_rows(device, ROWS)].clone(), ROWS)
        collective.all_gather(device, x)  # shapes unknown in advance: the shapes first, then the values

    results = in_one_group((0, 1, 2), every_sum, wait_limit_s=30.0)
    assert all(result is None for result in results.values()), results
    assert made == ["all_reduce", "reduce_scatter", "all_gather_rows", "all_gather", "all_gather"]
