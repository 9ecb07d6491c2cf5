"""Run data work on one intra-op thread.

Per-sample tensors are small: torch's intra-op threads only add sync cost,
and on a busy host (training threads, loader workers, other jobs) a 1 ms op
was measured at 50-250 ms. The caller's setting is restored afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def one_thread():
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)
