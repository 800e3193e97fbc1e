"""FlatPerturb under DeepSpeed's engine (ZeRO-1/2/3) on two gloo CPU ranks: one spawn runs every
case of `deepspeed_cases.CASES` (see tests/integrations/deepspeed_cases.py), each next to an
unsharded reference with the same seed and rank; the resumed runs of `deepspeed_cases.RESUMED`
(engine.save_checkpoint / load_checkpoint); and the framework runs of
tests/integrations/deepspeed_frameworks.py on a tiny peft GPT-2 under ZeRO-3: the HF Trainer with
a DeepSpeed config (and resuming from its checkpoint) and Accelerate's DeepSpeed plugin. The
tests below read what the ranks saved.

``python tests/integrations/test_deepspeed.py`` runs the same spawn and prints a table.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import deepspeed_frameworks as frameworks
import pytest
import torch.distributed as dist
from deepspeed_cases import (
    CASES,
    RESUME_AT,
    RESUMED,
    SIGMA,
    STEPS,
    TOTAL_STEPS,
    deepspeed_env,
    guarded,
    run_case,
    run_foreign_optimizer,
    run_resume,
    run_step_while_armed,
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
        for case in RESUMED:
            directory = str(Path(out_dir) / f"checkpoint-{case.name}")
            results[f"resume_{case.name}"] = guarded(run_resume, case, directory)
        for stage in (3, 2):
            results[f"foreign_zero{stage}"] = guarded(run_foreign_optimizer, stage)
        for order in ("before", "handed"):
            results[f"armed_{order}"] = guarded(run_step_while_armed, order)
        trainer_dir = str(Path(out_dir) / "trainer")  # shared: each rank saves its own shards
        for name, run, args in (
            ("trainer", frameworks.run_trainer, (trainer_dir, False)),
            ("trainer_resumed", frameworks.run_trainer, (trainer_dir, True)),
            ("accelerate", frameworks.run_accelerate, ()),
            ("trainer_handed", frameworks.run_trainer_handed_optimizers, (trainer_dir + "-h",)),
        ):
            frameworks.fresh_frameworks()
            results[name] = guarded(run, *args)
        frameworks.fresh_frameworks()
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


@pytest.mark.parametrize("name", NAMES)
def test_no_case_warns_that_something_else_trains_the_model(ranks, name):
    for report in reports(ranks, name):
        assert report["stuck"] == []


@pytest.mark.parametrize("stage", [3, 2])
def test_deepspeeds_own_optimizer_training_the_model_warns_that_flatopt_is_stuck(ranks, stage):
    """A config "optimizer" section: DeepSpeed trains the model with an optimizer of its own,
    and FlatPerturb (wrapping another one) never steps. flatopt says so, once."""
    for report in reports(ranks, f"foreign_zero{stage}"):
        assert report["num_steps"] == 0
        assert len(report["stuck"]) == 1, report["stuck"]
        assert '"optimizer" section' in report["stuck"][0]


def test_hf_trainer_dropping_handed_optimizers_under_deepspeed_warns_naming_trainer_optimizer(
    ranks,
):
    """Under DeepSpeed the Trainer replaces optimizers=(opt, None) by an AdamW of its own."""
    for report in reports(ranks, "trainer_handed"):
        assert report["engine_optimizer"] == "AdamW"
        assert report["num_steps"] == 0
        assert len(report["warnings"]) == 1, report["warnings"]
        assert "counted no step" in report["warnings"][0]
        assert "trainer_optimizer" in report["warnings"][0]


@pytest.mark.parametrize("order", ["before", "handed"])
def test_engine_step_inside_perturbed_raises_naming_where_it_goes(ranks, order):
    for report in reports(ranks, f"armed_{order}"):
        assert report["message"] is not None, "engine.step() inside perturbed() did not raise"
        assert report["message"].startswith("DeepSpeed's engine.step() ran while")
        assert "after the block" in report["message"] and "auto=True" in report["message"]
        assert not report["perturbed"]
        assert report["num_steps"] == 0


@pytest.mark.parametrize("name", [case.name for case in RESUMED])
def test_engine_checkpoint_resumes_bit_for_bit_with_the_flatopt_entry(ranks, name):
    """engine.save_checkpoint saves the torch optimizer's state inside the ZeRO optimizer's:
    FlatPerturb's own when it was handed to initialize, the wrapped one's otherwise, which then
    carries the "flatopt" entry too. load_checkpoint puts it back into the FlatPerturb."""
    for rank, report in enumerate(reports(ranks, f"resume_{name}")):
        assert report["saved_entry"] is not None, "the checkpoint has no 'flatopt' entry"
        assert report["saved_entry"]["num_steps"] == RESUME_AT
        assert report["loaded_at"] == RESUME_AT
        assert report["steps"] == (STEPS, STEPS)
        assert report["sigmas"][0] == report["sigmas"][1]
        assert report["resumed_reads"] >= (STEPS - RESUME_AT) * len(TARGETS)
        assert report["differ"] == [], listed(rank, report["differ"])


GPT2_TARGETS = [
    f"base_model.model.transformer.h.{block}.{name}"
    for block in range(2)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")
]
# Optimizer steps each run takes (the resumed run: those after the checkpoint).
FRAMEWORK_STEPS = {
    "trainer": frameworks.STEPS,
    "trainer_resumed": frameworks.STEPS - frameworks.SAVE_AT,
    "accelerate": frameworks.STEPS,
}


@pytest.mark.parametrize("name", ["trainer", "trainer_resumed", "accelerate"])
def test_frameworks_over_deepspeed_see_the_unsharded_w_plus_eps_bitwise(ranks, name):
    """peft's LoRA layers under ZeRO-3, trained by the HF Trainer with a DeepSpeed config and
    trainer_optimizer (auto=True), or by an Accelerate loop with the DeepSpeed plugin."""
    steps = FRAMEWORK_STEPS[name]
    for rank, report in enumerate(reports(ranks, name)):
        assert report["engine_optimizer"] == "FlatPerturb"  # the engine steps FlatPerturb itself
        assert report["targets"] == report["ref_targets"] == GPT2_TARGETS
        # Every training forward of every target: frameworks.ACCUM micro-batches per step.
        assert report["compared"] == steps * frameworks.ACCUM * len(GPT2_TARGETS)
        assert report["seen"] == [], listed(rank, report["seen"])
        assert report["noiseless"] == [], listed(rank, report["noiseless"])
        assert report["num_steps"] == frameworks.STEPS
        assert report["frozen_count"] > 0
        assert report["frozen_moved"] == [], listed(rank, report["frozen_moved"])
        assert report["warnings"] == []


def test_hf_trainer_resumes_from_its_deepspeed_checkpoint_bit_for_bit(ranks):
    """The Trainer's checkpoint-N/global_stepN holds FlatPerturb.state_dict(), "flatopt"
    included, inside each rank's ZeRO optimizer state; resuming continues the noise and the
    training bit for bit."""
    full = reports(ranks, "trainer")
    resumed = reports(ranks, "trainer_resumed")
    ramp = [0.5 * (1 - math.cos(math.pi * t / frameworks.STEPS)) for t in range(frameworks.STEPS)]
    for rank, (first, second) in enumerate(zip(full, resumed)):
        assert first["saved_entry"]["num_steps"] == frameworks.SAVE_AT
        assert first["saved_entry"]["seed"] == frameworks.SEED
        assert first["sigmas"] == pytest.approx([frameworks.SIGMA * f for f in ramp])
        assert second["sigmas"] == first["sigmas"][frameworks.SAVE_AT :]
        assert first["trained"].keys() == second["trained"].keys()
        for n, value in first["trained"].items():
            assert value.equal(second["trained"][n]), f"rank {rank}: {n} differs after resuming"


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        ranks = spawn(_worker, Path(directory), TIMEOUT, DEADLINE_S)
    print(f"{'case':34} {'forwards':>8} {'W+eps diffs':>11} {'max |grad diff|':>15}  error")
    for name in [*NAMES, *(f"resume_{case.name}" for case in RESUMED), *FRAMEWORK_STEPS]:
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
