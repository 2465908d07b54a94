"""`wait_until()`: poll a condition with a deadline (a helper module, not a test module)."""
from __future__ import annotations

import time
from typing import Callable


def wait_until(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.01) -> bool:
    """Poll `condition` until it holds (True) or `timeout_s` has passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(every_s)
    return True
