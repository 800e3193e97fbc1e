"""Private random generators, one per device, and the thread pool that draws CPU blocks.

flatopt never touches torch's global RNG: every draw uses a generator from `Generators`,
reseeded from the draw's own seed. A CPU draw is split into blocks with their own seeds
(`flatopt.noise.blocks`), which `_parallel` draws on torch's thread count with the same bits
whatever the count.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

__all__ = ["Generators"]


class _Parallel:
    """Runs the blocks of a CPU draw on torch's thread count, one generator per thread.

    torch's CPU generator draws one stream on one core; the blocks of a draw have their own
    seeds (`flatopt.noise.blocks`), so they can be drawn on several cores with the same bits.
    """

    def __init__(self) -> None:
        self._pool: Optional[ThreadPoolExecutor] = None
        self._owner = (0, 0)  # (process id, worker count) the pool was made for
        self._local = threading.local()

    def _generator(self) -> torch.Generator:
        generator = getattr(self._local, "generator", None)
        if generator is None:
            generator = self._local.generator = torch.Generator()
        return generator

    def _run(self, fill: Callable[[int, torch.Generator], None], indices: range) -> None:
        generator = self._generator()
        for index in indices:
            fill(index, generator)

    def __call__(self, fill: Callable[[int, torch.Generator], None], count: int) -> None:
        workers = min(torch.get_num_threads(), count)
        share = -(-count // workers)
        ranges = [range(start, min(start + share, count)) for start in range(0, count, share)]
        if len(ranges) == 1:
            self._run(fill, ranges[0])
            return
        pool, owner = self._pool, (os.getpid(), torch.get_num_threads() - 1)
        if pool is None or self._owner != owner:  # first use, after a fork, or new thread count
            if pool is not None and self._owner[0] == owner[0]:
                pool.shutdown(wait=False)
            pool = self._pool = ThreadPoolExecutor(owner[1], thread_name_prefix="flatopt")
            self._owner = owner
        futures = [pool.submit(self._run, fill, indices) for indices in ranges[1:]]
        self._run(fill, ranges[0])
        for future in futures:
            future.result()


_parallel = _Parallel()


class Generators:
    """One private ``torch.Generator`` per device, created on first use."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, torch.Generator] = {}

    def __call__(self, device: torch.device) -> torch.Generator:
        generator = self._by_device.get(device)
        if generator is None:
            generator = self._by_device[device] = torch.Generator(device=device)
        return generator
