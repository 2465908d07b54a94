"""The thread backend, the device boundary: what each collective call gives every device, that a
failed or aborted round releases every device instead of leaving it waiting, that every wait ends
at its limit, point-to-point transfers, payloads as bytes, epochs that end, and inboxes."""
from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from device_actor import DeviceActor, DeviceSetup
from device_network import StaleEpoch, StepAbandoned, WaitStalled
from device_protocol import DRIVER, Address, Describe, Envelope, NewEpoch, RecoveryPolicy, Reply
from device_threads import CODECS, ThreadCollective, ThreadTransport
from head_assignment import even_assignment
from heartbeat_detection import HeartbeatConfig
from llama_model_loader import LlamaConfig
from on_threads import on_threads

Body = Callable[[int, ThreadCollective], Any]


def on_devices(devices: int, body: Body, collective: ThreadCollective | None = None) -> list[Any]:
    """Run `body(device, collective)` on one thread per device; each device's result or exception."""
    collective = collective or ThreadCollective(range(devices), epoch=0)
    results = on_threads(range(devices), lambda device: body(device, collective), timeout_s=10)
    return [results[device] for device in range(devices)]


def device_tensor(device: int, round_: int, rows: int = 5) -> torch.Tensor:
    return torch.arange(rows * 3, dtype=torch.float32).view(rows, 3) * (device + 1) + 100 * round_


def test_all_reduce_gives_every_device_the_sum():
    results = on_devices(3, lambda d, c: c.all_reduce(d, device_tensor(d, 0)))
    expected = sum(device_tensor(d, 0) for d in range(3))
    for result in results:
        assert torch.equal(result, expected)


@pytest.mark.parametrize("devices", [1, 2, 3, 4, 5])
def test_own_rows_split_any_length_into_contiguous_pieces_in_device_order(devices):
    collective = ThreadCollective(range(devices), epoch=0)
    for length in range(0, 23):
        pieces = [collective.own_rows(d, length) for d in range(devices)]
        covered = [row for piece in pieces for row in range(length)[piece]]
        assert covered == list(range(length))
        sizes = [len(range(length)[piece]) for piece in pieces]
        assert max(sizes) - min(sizes) <= 1


def test_reduce_scatter_gives_each_device_its_rows_of_the_sum():
    results = on_devices(3, lambda d, c: (c.own_rows(d, 5), c.reduce_scatter(d, device_tensor(d, 0))))
    total = sum(device_tensor(d, 0) for d in range(3))
    assert torch.equal(torch.cat([rows for _, rows in results]), total)
    for rows, part in results:
        assert torch.equal(part, total[rows])


def test_all_gather_rows_joins_every_devices_rows_into_the_whole_tensor():
    whole = torch.randn(7, 4)

    def gather_twice(device: int, collective: ThreadCollective) -> tuple[torch.Tensor, torch.Tensor]:
        first = collective.all_gather_rows(device, whole[collective.own_rows(device, 7)], 7)
        second = collective.all_gather_rows(device, -whole[collective.own_rows(device, 7)], 7)
        return first, second

    for first, second in on_devices(3, gather_twice):
        assert torch.equal(first, whole)  # not overwritten by the next round
        assert torch.equal(second, -whole)


def test_many_quick_rounds_never_mix_up_their_values():
    def rounds(device: int, collective: ThreadCollective) -> list[bool]:
        checks = []
        for r in range(200):
            total = collective.all_reduce(device, device_tensor(device, r))
            rows = collective.reduce_scatter(device, device_tensor(device, r))
            expected = sum(device_tensor(d, r) for d in range(4))
            checks.append(torch.equal(total, expected) and torch.equal(rows, expected[collective.own_rows(device, 5)]))
        return checks

    for checks in on_devices(4, rounds):
        assert all(checks)


def test_a_sum_that_fails_raises_on_its_device_and_releases_the_others():
    results = on_devices(3, lambda d, c: c.all_reduce(d, torch.ones(2 + (d == 2))))
    assert sum(isinstance(r, RuntimeError) for r in results) == 1  # the last to arrive, which sums
    assert sum(isinstance(r, StepAbandoned) for r in results) == 2


def test_abort_releases_waiting_devices_and_fails_later_calls():
    started = threading.Barrier(3)

    def body(device: int, collective: ThreadCollective):
        started.wait()
        if device == 2:  # devices 0 and 1 are waiting, or about to
            collective.abort()
        return collective.all_reduce(device, torch.ones(1))

    assert all(isinstance(r, StepAbandoned) for r in on_devices(3, body))


# --------------------------------------------------------------------------------------------
# Every wait ends: at the wait limit, saying who waited for whom, where; or at once on an abort

LIMIT_S = 0.2


def test_a_round_whose_peer_never_arrives_ends_at_the_wait_limit_naming_the_absent_device():
    collective = ThreadCollective((0, 1, 2), epoch=4, wait_limit_s=LIMIT_S)

    def body(device: int, c: ThreadCollective):
        if device == 2:
            return "wedged: never arrives"
        started = time.monotonic()
        with pytest.raises(StepAbandoned) as ended:
            c.all_reduce(device, torch.ones(1))
        return ended.value, time.monotonic() - started

    waiting = dict(enumerate(on_devices(3, body, collective)[:2]))
    stalled = {device: (error, waited) for device, (error, waited) in waiting.items() if isinstance(error, WaitStalled)}
    assert stalled, waiting  # the first to reach the limit says why, and breaks the round for the other
    device, (error, waited) = next(iter(stalled.items()))
    assert str(error) == f"Device-{device} waited 0.2 s for Device-2 in epoch 4's all_reduce: nothing came"
    assert LIMIT_S <= waited < LIMIT_S + 2.0 and collective.aborted


def test_a_recv_whose_sender_never_sends_ends_at_the_wait_limit_naming_it():
    collective = ThreadCollective((0, 1), epoch=3, wait_limit_s=LIMIT_S)
    started = time.monotonic()
    with pytest.raises(WaitStalled) as stalled:
        collective.recv(1, source=0)
    assert LIMIT_S <= time.monotonic() - started < LIMIT_S + 2.0
    assert str(stalled.value) == "Device-1 waited 0.2 s for Device-0 in epoch 3's recv: nothing came"


def test_an_abort_still_releases_a_waiting_recv_at_once():
    collective = ThreadCollective((0, 1), epoch=0, wait_limit_s=60.0)
    threading.Timer(0.1, collective.abort).start()
    started = time.monotonic()
    with pytest.raises(StepAbandoned) as released:
        collective.recv(1, source=0)
    assert not isinstance(released.value, WaitStalled) and time.monotonic() - started < 5.0


def test_a_transport_gives_its_groups_its_wait_limit():
    assert ThreadTransport(wait_limit_s=0.5).collective(0, (0, 1)).wait_limit_s == 0.5


# --------------------------------------------------------------------------------------------
# Point to point, codecs, epochs and inboxes


@pytest.mark.parametrize("codec", list(CODECS))
def test_send_hands_a_payload_to_one_device_and_recv_waits_for_it(codec):
    collective = ThreadCollective((0, 1, 2), epoch=0, codec=CODECS[codec])

    def body(device: int, c: ThreadCollective):
        if device == 0:
            time.sleep(0.05)  # the receiver is already waiting
            c.send(0, 2, {"kv": torch.arange(4.0)})
            return None
        return c.recv(device, 0) if device == 2 else "idle"

    results = on_devices(3, body, collective)
    assert torch.equal(results[2]["kv"], torch.arange(4.0)) and results[1] == "idle"


def test_as_bytes_every_device_gets_its_own_copy_and_as_threads_they_share_the_sum():
    def reduce(device: int, c: ThreadCollective):
        return c.all_reduce(device, torch.ones(3))

    shared = on_devices(3, reduce, ThreadCollective((0, 1, 2), 0, CODECS["threads"]))
    copies = on_devices(3, reduce, ThreadCollective((0, 1, 2), 0, CODECS["serialising"]))
    assert all(torch.equal(r, torch.full((3,), 3.0)) for r in shared + copies)
    assert len({r.data_ptr() for r in shared}) == 1  # one sum, read by all
    assert len({r.data_ptr() for r in copies}) == 3  # nothing crosses but bytes


def test_a_later_epochs_group_ends_the_earlier_one_and_its_calls_are_refused_as_stale():
    transport = ThreadTransport()
    old = transport.collective(0, (0, 1))
    assert transport.collective(0, (0, 1)) is old
    new = transport.collective(1, (0,))
    assert new is not old and old.ended_by == 1 and old.aborted
    with pytest.raises(StaleEpoch, match=r"epoch 0's group has ended \(epoch 1 began\)"):
        old.all_reduce(0, torch.ones(1))
    with pytest.raises(StaleEpoch):
        old.send(0, 1, "late")
    assert torch.equal(new.all_reduce(0, torch.ones(1)), torch.ones(1))
    with pytest.raises(ValueError, match="members"):
        transport.collective(1, (0, 1))


@pytest.mark.parametrize("codec", list(CODECS))
def test_inboxes_deliver_envelopes_in_order_and_time_out_empty(codec):
    transport = ThreadTransport(CODECS[codec])
    inbox = Address("commands", 3)
    for i in range(3):
        transport.send(inbox, Envelope(DRIVER, 0, i, ("payload", i)))
    assert [transport.receive(inbox, 0.1).request for _ in range(3)] == [0, 1, 2]
    started = time.monotonic()
    assert transport.receive(inbox, 0.05) is None and time.monotonic() - started >= 0.04
    assert transport.receive(Address("commands", 4), 0.01) is None  # another device's inbox is its own


# --------------------------------------------------------------------------------------------
# A device's membership: its epoch and members, read by one thread while another replaces them


def new_device(checkpoint: Path, transport: ThreadTransport, kind: type[DeviceActor] = DeviceActor) -> DeviceActor:
    """Device-0 of four on the tiny checkpoint, not started: the test drives its methods."""
    assignment = even_assignment(LlamaConfig.from_json(checkpoint / "config.json"), 4)
    return kind(DeviceSetup(0, checkpoint, "float32", assignment, HeartbeatConfig(), RecoveryPolicy()), transport)


class PreemptedAtEveryWrite(DeviceActor):
    """A device (never started) that, once `reader` is set, runs it after every attribute it writes:
    as if the thread writing were preempted at each point and another thread read the device there.
    The reader's own writes are not preemption points."""

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        reader = self.__dict__.pop("reader", None)
        if reader is not None:
            try:
                reader()
            finally:
                object.__setattr__(self, "reader", reader)


def test_a_step_taking_the_collective_while_a_new_epoch_is_admitted_sees_one_epoch_whole(tiny_checkpoint):
    """Device-3 was declared dead: the leader formed epoch 1's group of (0, 1, 2) and tells Device-0,
    whose control thread admits it while its compute thread takes the collective for a step. At any
    point of the admission the step gets epoch 0's group or epoch 1's, never epoch 1 with epoch 0's
    members (epoch 1's group refuses them: a ValueError the leader would take for a device error)."""
    transport = ThreadTransport()
    device = new_device(tiny_checkpoint, transport, PreemptedAtEveryWrite)
    assignment = device._assignment
    transport.collective(0, (0, 1, 2, 3))
    transport.collective(1, (0, 1, 2))  # the leader claims the new epoch's group before telling anyone
    seen: list = []

    def step_takes_the_collective() -> None:
        try:
            group = device._endpoint().group
            seen.append((group.epoch, group.devices))
        except ValueError as refused:
            seen.append(refused)

    device.reader = step_takes_the_collective
    device._admit(NewEpoch(1, (0, 1, 2), assignment, 0, (3,)))
    assert seen, "the admission wrote nothing"
    assert set(seen) <= {(0, (0, 1, 2, 3)), (1, (0, 1, 2))}, seen
    assert seen[-1] == (1, (0, 1, 2))


# --------------------------------------------------------------------------------------------
# A device's answers: never lost without a word


def test_an_answer_that_cannot_cross_as_bytes_is_replaced_by_an_error_saying_why(tiny_checkpoint):
    transport = ThreadTransport(CODECS["serialising"])
    device = new_device(tiny_checkpoint, transport)
    device._answer(Envelope(0, 0, 7, Describe()), Reply(lambda: "a function does not pickle"))
    envelope = transport.receive(Address("results", 0), timeout=1.0)
    assert envelope is not None, "the leader would wait for an answer that never comes"
    assert envelope.request == 7 and envelope.body.value is None
    assert "Device-0 could not send its answer to Describe" in str(envelope.body.error)
    assert "pickle" in str(envelope.body.error).lower()


class NoWayToTheLeader(ThreadTransport):
    """Every answer to the leader fails to go out (other messages go)."""

    def send(self, to: Address, envelope: Envelope) -> None:
        if to.kind == "results":
            raise OSError("the leader's inbox is unreachable")
        super().send(to, envelope)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the error is the point
def test_a_compute_thread_that_cannot_answer_at_all_ends_its_device_and_its_error_is_kept(tiny_checkpoint):
    """Not a compute thread dead behind a device that still beats (which the leader would wait for):
    the whole device stops, so that it is declared dead, and its error is kept for close()."""
    transport = NoWayToTheLeader()
    device = new_device(tiny_checkpoint, transport)
    transport.start_thread("Device-0", device._serve_commands)
    transport.send(Address("commands", 0), Envelope(0, 0, 1, Describe()))
    assert transport.join(timeout_s=30.0) == [], "the compute thread is still running"
    assert device._stopping.is_set(), "the device goes on without its compute thread"
    ((thread, error),) = transport.crashed
    assert thread == "Device-0" and "the leader's inbox is unreachable" in str(error)


def test_a_closed_model_lets_go_of_every_devices_memory_without_waiting_for_the_garbage_collector(
        tiny_checkpoint):
    """A device sits in reference cycles (its fault switch and monitor call back into it): unless
    it drops its state when it stops, a benchmark that loads one model after another holds them all."""
    from tensor_parallel_cluster import TensorParallelLlama
    from tensor_parallel_model import DeviceState
    gc.disable()
    try:
        with TensorParallelLlama.load(tiny_checkpoint, devices=4, log=lambda message: None) as model:
            model.generate_batch([[1, 2, 3], [4, 5]], 2)
        del model
        assert [o for o in gc.get_objects() if type(o) is DeviceState] == []
    finally:
        gc.enable()
