"""The thread collective, the device boundary: what each call gives every device, and that a
failed or aborted round releases every device instead of leaving it waiting."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import pytest
import torch

from device_threads import DeviceWorker, StaleEpoch, StepAbandoned, ThreadCollective, run_on_devices

Body = Callable[[int, ThreadCollective], Any]


def on_devices(devices: int, body: Body, collective: ThreadCollective | None = None) -> list[Any]:
    """Run `body(device, collective)` on one thread per device; each device's result or exception."""
    collective = collective or ThreadCollective(range(devices))
    results: list[Any] = [None] * devices

    def run(device: int) -> None:
        try:
            results[device] = body(device, collective)
        except Exception as error:  # noqa: BLE001 - handed back to the test
            results[device] = error

    threads = [threading.Thread(target=run, args=(d,)) for d in range(devices)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a device is still waiting"
    return results


def device_tensor(device: int, round_: int, rows: int = 5) -> torch.Tensor:
    return torch.arange(rows * 3, dtype=torch.float32).view(rows, 3) * (device + 1) + 100 * round_


def test_all_reduce_gives_every_device_the_sum():
    results = on_devices(3, lambda d, c: c.all_reduce(d, device_tensor(d, 0)))
    expected = sum(device_tensor(d, 0) for d in range(3))
    for result in results:
        assert torch.equal(result, expected)


@pytest.mark.parametrize("devices", [1, 2, 3, 4, 5])
def test_own_rows_split_any_length_into_contiguous_pieces_in_device_order(devices):
    collective = ThreadCollective(range(devices))
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
# The root error of a failed step


def test_a_devices_real_error_is_raised_even_when_its_peers_abandoned_the_step_first():
    """Device-2 breaks the step and raises its error 0.2 s later: its peers' StepAbandoned (which the
    break caused) arrive first, and must not hide the error that is the cause."""
    workers = [DeviceWorker(d) for d in range(3)]
    collective = ThreadCollective((0, 1, 2))

    def breaks_then_fails(device: int) -> None:
        if device == 2:
            collective.abort()
            time.sleep(0.2)
            raise ValueError("Device-2's programming error")
    collective.fault_hook = breaks_then_fails
    try:
        for _ in range(3):
            with pytest.raises(ValueError, match="Device-2's programming error"):
                run_on_devices(workers, lambda w: collective.all_reduce(w.device, torch.ones(2)), collective)
            collective = ThreadCollective((0, 1, 2), fault_hook=breaks_then_fails)
    finally:
        for worker in workers:
            worker.stop(timeout=5)


def test_a_call_stamped_with_an_ended_epoch_is_refused_before_it_touches_anything():
    class Epochs:
        def __init__(self):
            self.now, self.own = 1, {0: 1, 1: 1}

        def current(self):
            return self.now

        def of(self, device):
            return self.own[device]

    epochs = Epochs()
    collective = ThreadCollective((0, 1), epoch=1, epochs=epochs)
    epochs.own[1] = 0  # Device-1 missed the declaration that opened epoch 1
    with pytest.raises(StaleEpoch, match="Device-1 called with epoch 0 into epoch 1's collective"):
        collective.all_reduce(1, torch.ones(1))
    epochs.own[1], epochs.now = 1, 2  # the collective's own epoch has ended
    with pytest.raises(StaleEpoch, match=r"\(current epoch 2\)"):
        collective.all_gather(0, torch.ones(1))
    assert not collective.aborted  # refused by the epoch alone
