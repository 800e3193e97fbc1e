"""FlatPerturb on a model sharded with FSDP2 (``fully_shard``): two gloo processes on CPU, over the
loopback interface only.

One spawn runs every case of `fsdp_cases.CASES` on both ranks, each in a process group of its own,
next to an unsharded reference in the same process (see tests/fsdp_cases.py): the same seed and
rank, loaded with the sharded model's gathered parameters at every step. Then a distributed
checkpoint taken mid-run and resumed, FSDP1, and a weight still sharded inside its forward (tensor
parallelism). The tests below read what the ranks saved.

``python tests/test_fsdp.py`` runs the same spawn and prints, per case, the largest difference
between FSDP's averaged gradient and the reference's.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from fsdp_cases import (
    CASES,
    HIDDEN,
    MICRO,
    OUT,
    RESUME_AT,
    SIGMA,
    STEPS,
    TOTAL_STEPS,
    WIDTH,
    in_group,
    process_group,
    run_case,
    run_fsdp1,
    run_resume,
    run_tensor_parallel,
    spawn,
)
from ranks import listed, reports

_TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
    # On torch 2.8, FSDP2 over gloo sums the gradients of the two ranks where later releases
    # average them (a factor of 2 at every step, with or without flatopt): the references here
    # average. FSDP2 is tested, and supported, from torch 2.9 on.
    pytest.mark.skipif(_TORCH < (2, 9), reason="FSDP2 over gloo averages gradients from torch 2.9"),
]

TIMEOUT = datetime.timedelta(seconds=30)  # every rendezvous and collective
DEADLINE_S = 300  # the whole spawn; a stuck run is killed, never left hanging
NAMES = [case.name for case in CASES]
TARGETS = [
    ("blocks.0.up", (HIDDEN[0], WIDTH)),
    ("blocks.0.down", (WIDTH, HIDDEN[0])),
    ("blocks.1.up", (HIDDEN[1], WIDTH)),
    ("blocks.1.down", (WIDTH, HIDDEN[1])),
    ("head", (OUT, WIDTH)),
]


def _worker(rank: int, host: str, port: int, out_dir: str) -> None:
    with process_group(rank, host, port, TIMEOUT):
        results = {"rank": dist.get_rank()}
        for case in CASES:
            results[case.name] = in_group(TIMEOUT, run_case, case)
        results["resume"] = in_group(TIMEOUT, run_resume, str(Path(out_dir) / "checkpoint"))
        results["fsdp1"] = in_group(TIMEOUT, run_fsdp1)
        results["tensor_parallel"] = in_group(TIMEOUT, run_tensor_parallel)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(_worker, tmp_path_factory.mktemp("fsdp"), TIMEOUT, DEADLINE_S)


@pytest.mark.parametrize("name", NAMES)
def test_each_forward_sees_the_unsharded_w_plus_eps_bitwise(ranks, name):
    for rank, report in enumerate(reports(ranks, name)):
        assert report["targets"] == TARGETS  # logical shapes of the whole weights, not shards
        assert report["ref_targets"] == TARGETS
        assert report["compared"] >= STEPS * MICRO * len(TARGETS)
        assert report["seen"] == [], listed(rank, report["seen"])
        assert report["noiseless"] == [], listed(rank, report["noiseless"])


@pytest.mark.parametrize("name", NAMES)
def test_the_averaged_gradient_is_the_mean_of_the_unsharded_references(ranks, name):
    for rank, report in enumerate(reports(ranks, name)):
        assert report["grads"] == [], listed(rank, report["grads"])


@pytest.mark.parametrize("name", [case.name for case in CASES if case.layout == "blocks"])
def test_with_whole_blocks_as_units_the_averaged_gradient_is_bitwise_the_references(ranks, name):
    # FSDP's units end where the residual blocks do, so each input's gradient is summed in the
    # unsharded model's order; two ranks average exactly (a + b = b + a, halving is exact).
    for rank, report in enumerate(reports(ranks, name)):
        assert report["grad_bitwise"], f"rank {rank}: max |diff| {report['grad_max_diff']:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_the_gathered_parameters_stay_those_of_an_unsharded_run(ranks, name):
    for rank, report in enumerate(reports(ranks, name)):
        assert report["solo"] == [], listed(rank, report["solo"])
        assert report["num_steps"] == STEPS


@pytest.mark.parametrize("name", NAMES)
def test_frozen_shards_stay_bitwise_unchanged_and_unmoved(ranks, name):
    for rank, report in enumerate(reports(ranks, name)):
        assert report["frozen_count"] >= 2 * len(HIDDEN) * 2  # weight and bias of every layer
        assert report["frozen_moved"] == [], listed(rank, report["frozen_moved"])
        # Between the forward and the backward, and after the step, every target module holds
        # FSDP's sharded parameter or FSDP's unsharded clean one: no W + ε, no freed storage.
        assert report["held"] == [], listed(rank, report["held"])
        assert report["eval"] == [], listed(rank, report["eval"])


@pytest.mark.parametrize("name", NAMES)
def test_ranks_draw_their_own_noise_unless_told_otherwise(ranks, name):
    case = next(c for c in CASES if c.name == name)
    first, second = (report["first_seen"] for report in reports(ranks, name))
    sigmas = ranks[0][name]["sigmas"]
    assert len(first) == len(second) == len(sigmas) == STEPS
    for a, b, sigma in zip(first, second, sigmas):
        if sigma == 0:  # σ_0 = 0: both ranks see the same clean W
            assert torch.equal(a, b)
        elif case.rank_noise:
            assert not torch.equal(a, b)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_the_schedule_counts_optimizer_steps(ranks, name):
    ramp = [0.5 * (1 - math.cos(math.pi * min(t, TOTAL_STEPS) / TOTAL_STEPS)) for t in range(STEPS)]
    for report in reports(ranks, name):
        assert report["sigmas"] == pytest.approx([SIGMA * factor for factor in ramp])


def test_a_distributed_checkpoint_resumes_bit_for_bit(ranks):
    for rank, report in enumerate(reports(ranks, "resume")):
        straight, resumed = report["straight"], report["resumed"]
        assert report["loaded"] == RESUME_AT
        assert resumed["num_steps"] == straight["num_steps"] == STEPS
        assert resumed["sigmas"] == straight["sigmas"][RESUME_AT:]
        assert straight["seen"] == [] and straight["grads"] == [], f"rank {rank}"
        for step, (a, b) in enumerate(
            zip(straight["first_seen"][RESUME_AT:], resumed["first_seen"])
        ):
            assert torch.equal(a, b), f"rank {rank}: step {RESUME_AT + step} saw other noise"
        assert straight["final"].keys() == resumed["final"].keys()
        for name, value in straight["final"].items():
            assert torch.equal(value, resumed["final"][name]), f"rank {rank}: {name}"
        assert resumed["frozen_moved"] == []


@pytest.mark.parametrize("model", ["wrapper", "inner"])
@pytest.mark.parametrize("head", [True, False], ids=["dense head", "lora only"])
def test_fsdp1_is_refused_with_a_pointer_to_fully_shard(ranks, model, head):
    """Built on the FSDP1 wrapper or on the module inside it (as on ``ddp.module``)."""
    key = f"{model}{', dense head' if head else ''}"
    for rank, report in enumerate(reports(ranks, "fsdp1")):
        raised, message = report["built"][key]
        assert raised == "TypeError", f"rank {rank}: nothing raised; W + ε vs unsharded: {message}"
        assert "FSDP1" in message and "fully_shard" in message, message


def test_a_weight_still_sharded_inside_its_forward_is_refused(ranks):
    for rank, report in enumerate(reports(ranks, "tensor_parallel")):
        # Step 0 (σ_0 = 0) perturbs nothing and runs; step 1 refuses the sharded weight.
        assert report["steps"] == 1, f"rank {rank}: {report}"
        assert report["raised"] == "RuntimeError", f"rank {rank}: {report}"
        assert "blocks.0.up" in report["message"]
        assert "tensor" in report["message"] and "fully_shard" in report["message"]


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        ranks = spawn(_worker, Path(directory), TIMEOUT, DEADLINE_S)
    print(f"{'case':42} {'forwards':>8} {'W+eps diffs':>11} {'max |grad diff|':>15}  error")
    for name in NAMES:
        for rank in ranks:
            report = rank[name]
            error = (report["error"] or "").strip().splitlines()[-1:] or [""]
            label = f"{name} (rank {rank['rank']})"
            gap = report.get("grad_max_diff", float("nan"))
            bitwise = " (bitwise)" if report.get("grad_bitwise") else ""
            print(
                f"{label:42} {report.get('compared', 0):8d} {len(report.get('seen', [])):11d} "
                f"{gap:15.3g}{bitwise}  {error[0][:70]}"
            )
    for name in ("resume", "fsdp1", "tensor_parallel"):
        print(name, {k: v for k, v in ranks[0][name].items() if not isinstance(v, dict)})


if __name__ == "__main__":
    main()
