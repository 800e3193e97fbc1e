"""FlatPerturb under DeepSpeed's engine (ZeRO-1/2/3) on two gloo CPU ranks: one spawn runs every
case of `deepspeed_cases.CASES` (see tests/integrations/deepspeed_cases.py), each next to an
unsharded reference with the same seed and rank. The tests below read what the ranks saved.

``python tests/integrations/test_deepspeed.py`` runs the same spawn and prints a table.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import pytest
import torch.distributed as dist
from deepspeed_cases import (
    CASES,
    SIGMA,
    STEPS,
    TOTAL_STEPS,
    deepspeed_env,
    guarded,
    run_case,
)
from fsdp_cases import HIDDEN, OUT, WIDTH
from ranks import WORLD, listed, process_group, reports, spawn

TIMEOUT = datetime.timedelta(seconds=60)
DEADLINE_S = 600
NAMES = [case.name for case in CASES]
TARGETS = [
    ("blocks.0.up", (HIDDEN[0], WIDTH)),
    ("blocks.0.down", (WIDTH, HIDDEN[0])),
    ("blocks.1.up", (HIDDEN[1], WIDTH)),
    ("blocks.1.down", (WIDTH, HIDDEN[1])),
    ("head", (OUT, WIDTH)),
]


def _worker(rank: int, host: str, port: int, out_dir: str) -> None:
    import torch

    deepspeed_env(rank, WORLD)
    with process_group(rank, host, port, TIMEOUT):
        results = {"rank": dist.get_rank()}
        for case in CASES:
            results[case.name] = guarded(run_case, case)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(_worker, tmp_path_factory.mktemp("deepspeed"), TIMEOUT, DEADLINE_S)


@pytest.mark.parametrize("name", NAMES)
def test_each_forward_sees_the_unsharded_w_plus_eps_bitwise(ranks, name):
    case = next(c for c in CASES if c.name == name)
    for rank, report in enumerate(reports(ranks, name)):
        assert report["targets"] == TARGETS  # whole logical shapes, never a (0,) partition
        assert report["ref_targets"] == TARGETS
        assert report["compared"] >= STEPS * case.accumulation * len(TARGETS)
        assert report["seen"] == [], listed(rank, report["seen"])
        assert report["noiseless"] == [], listed(rank, report["noiseless"])


@pytest.mark.parametrize("name", NAMES)
def test_the_averaged_gradient_is_the_mean_of_the_unsharded_references(ranks, name):
    for rank, report in enumerate(reports(ranks, name)):
        assert report["grads"] == [], listed(rank, report["grads"])


@pytest.mark.parametrize("name", NAMES)
def test_engine_step_advances_the_schedule_once_per_optimizer_step(ranks, name):
    ramp = [0.5 * (1 - math.cos(math.pi * min(t, TOTAL_STEPS) / TOTAL_STEPS)) for t in range(STEPS)]
    for report in reports(ranks, name):
        assert report["num_steps"] == list(range(1, STEPS + 1))
        assert report["sigmas"] == pytest.approx([SIGMA * f for f in ramp])


@pytest.mark.parametrize("name", NAMES)
def test_frozen_partitions_stay_bitwise_unchanged_and_unmoved(ranks, name):
    for rank, report in enumerate(reports(ranks, name)):
        assert report["frozen_count"] >= 2 * len(HIDDEN) * 2
        assert report["frozen_moved"] == [], listed(rank, report["frozen_moved"])


@pytest.mark.parametrize("name", NAMES)
def test_ranks_draw_their_own_noise(ranks, name):
    first, second = (report["first_seen"] for report in reports(ranks, name))
    for step, (a, b) in enumerate(zip(first, second)):
        if step == 0:  # σ_0 = 0
            assert a.equal(b)
        else:
            assert not a.equal(b)


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        ranks = spawn(_worker, Path(directory), TIMEOUT, DEADLINE_S)
    print(f"{'case':34} {'forwards':>8} {'W+eps diffs':>11} {'max |grad diff|':>15}  error")
    for name in NAMES:
        for rank in ranks:
            report = rank[name]
            error = (report["error"] or "").strip().splitlines()[-1:] or [""]
            print(
                f"{name + ' (rank ' + str(rank['rank']) + ')':34} {report.get('compared', 0):8d} "
                f"{len(report.get('seen', [])):11d} {report.get('grad_max_diff', math.nan):15.3g}"
                f"  {error[0][:80]}"
            )


if __name__ == "__main__":
    main()
