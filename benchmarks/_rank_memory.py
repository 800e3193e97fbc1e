"""What the two-rank memory benchmarks share (``fsdp_memory.py``, ``_zero_memory.py``): the
RSS read from ``/proc/self/status`` in each rank, and the per-rank table of peaks over runs."""

from __future__ import annotations

import statistics

MIB = 1 << 20


def status(field: str) -> int:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def per_rank(runs: dict[str, list], layer: int, held: str, ratio: str, what: str) -> list[dict]:
    """Each rank's median peak above the pre-step RSS per method, and FlatPerturb's extra in
    units of ``layer`` bytes (``what`` names that layer); printed and returned. ``held`` and
    ``ratio`` are the JSON keys of the bytes the rank holds and of that unit."""
    ranks = []
    for rank in range(2):
        extra = {
            m: statistics.median((r[rank]["peak"] - r[rank]["base"]) for r in runs[m]) for m in runs
        }
        shard = runs["lora"][0][rank]["shard_bytes"]
        difference = extra["flat"] - extra["lora"]
        ranks.append(
            {
                "rank": rank,
                held: shard,
                "peak_above_start_bytes": extra,
                "flat_minus_lora_bytes": difference,
                ratio: difference / layer,
            }
        )
        print(
            f"rank {rank}: {held.removesuffix('_bytes').replace('_', ' ')} {shard / MIB:.0f} MiB;"
            f" peak above the pre-step RSS: lora {extra['lora'] / MIB:.1f} MiB, flat "
            f"{extra['flat'] / MIB:.1f} MiB; flat - lora = {difference / MIB:.1f} MiB = "
            f"{difference / layer:.2f} x the largest {what}"
        )
    return ranks
