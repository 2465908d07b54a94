"""`on_threads()`: run a body on one thread per device and collect what each gave (a helper module,
not a test module)."""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable


def on_threads(devices: Iterable[int], body: Callable[[int], Any], timeout_s: float = 30.0) -> dict[int, Any]:
    """`body(device)` on one thread per device: each device's result, or the exception it raised.
    Fails if any device is still waiting after `timeout_s`."""
    devices = list(devices)
    results: dict[int, Any] = {}

    def run(device: int) -> None:
        try:
            results[device] = body(device)
        except Exception as error:  # noqa: BLE001 - handed back to the test
            results[device] = error

    threads = [threading.Thread(target=run, args=(d,)) for d in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    assert not any(t.is_alive() for t in threads), "a device is still waiting"
    return results
