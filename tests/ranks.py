"""Two gloo ranks on CPU for the distributed tests: spawn them, join them, read their reports.

The parent process holds the rendezvous store on a port the OS picks; each rank joins the
default process group, runs its cases, and saves what it found to ``out_dir/rank{rank}.pt``.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _loopback_interface():
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else None


def spawn(worker, out_dir: Path, timeout: datetime.timedelta, deadline_s: float) -> list[dict]:
    """Run ``worker(rank, host, port, out_dir)`` on two spawned ranks, which meet at a store this
    process holds; return what each saved to ``out_dir/rank{rank}.pt``, indexed by rank."""
    host = "127.0.0.1"
    # The parent holds the rendezvous store on a port the OS picks (bound to port 0): no race
    # for a "free" port, and every connection stays on the loopback address.
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timeout)
    previous = os.environ.get("GLOO_SOCKET_IFNAME")
    loopback = _loopback_interface()
    if loopback is not None:  # gloo's own connections between the ranks: loopback too
        os.environ["GLOO_SOCKET_IFNAME"] = loopback
    try:
        context = mp.start_processes(
            worker,
            args=(host, store.port, str(out_dir)),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + deadline_s
        try:
            while not context.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the ranks did not finish within {deadline_s} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join(timeout=10)
    finally:
        if loopback is not None:
            if previous is None:
                os.environ.pop("GLOO_SOCKET_IFNAME", None)
            else:
                os.environ["GLOO_SOCKET_IFNAME"] = previous
        del store
    results = [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]
    assert [r["rank"] for r in results] == list(range(WORLD))
    return results


@contextlib.contextmanager
def process_group(rank: int, host: str, port: int, timeout: datetime.timedelta):
    """Join the default gloo process group at the parent's store; leave it on the way out."""
    torch.set_num_threads(1)
    store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timeout)
    try:
        yield
    finally:
        gc.collect()  # FSDP state held by a reference cycle goes while the group lives
        dist.destroy_process_group()


def reports(ranks: list[dict], name: str) -> list[dict]:
    """Both ranks' reports of one case; fails with a rank's traceback if it raised."""
    found = [rank[name] for rank in ranks]
    for rank, report in enumerate(found):
        assert report["error"] is None, f"rank {rank} raised:\n{report['error']}"
    return found


def listed(rank: int, problems: list[str]) -> str:
    shown = "\n  ".join(problems[:8])
    return f"rank {rank}, {len(problems)} found:\n  {shown}"
