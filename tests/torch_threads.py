"""`one_thread()`: run a block on one torch intra-op thread (a helper module, not a test module)."""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def one_thread():
    """One intra-op thread, as each device thread runs: on a busy 2-core machine two OpenMP threads wait
    on each other and a forward (e.g. transformers' 135M model) takes 15 times longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
