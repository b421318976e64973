"""Peak memory of one call, on CPU as on CUDA: the most bytes held at once above what was live before it.

* CUDA: the caching allocator's own peak (``torch.cuda.max_memory_allocated`` after a reset).
* CPU: torch has no CPU allocator statistics, so the profiler records every allocation and free of torch's
  CPU allocator (``profile_memory=True``) and the peak of their running sum is taken. This sees temporaries
  inside custom ops and C++ kernels that allocate through torch; memory a library mallocs on its own is not
  seen. The profiled call runs once, apart from the timed ones.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch

__all__ = ["peak_bytes"]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: kineto logs two lines per profiling session from C++, past Python's reach."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = sorted(
        (node.start_time_ns, node.typed[1].ptr, node.typed[1].alloc_size)
        for node in walk(prof.profiler.kineto_results.experimental_event_tree())
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu"
    )
    # Frees are matched to this call's own allocations by address: the allocator also reports frees of
    # blocks it remembers from earlier profiling sessions, which must not lower the running sum.
    live: dict[int, int] = {}
    held = peak = 0
    for _, ptr, size in events:
        if size > 0:
            live[ptr] = size
            held += size
            peak = max(peak, held)
        elif ptr in live:
            held -= live.pop(ptr)
    return peak


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Most bytes allocated at once during one call of ``fn`` beyond those live when it starts."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return _cpu_peak_bytes(fn)
