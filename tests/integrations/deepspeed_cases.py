"""What each rank runs for tests/integrations/test_deepspeed.py: the small LoRA model of
tests/fsdp_cases.py trained through DeepSpeed's engine (ZeRO-1/2/3, CPU, gloo), next to an
unsharded reference in the same process.

The reference is an unsharded copy with its own FlatPerturb (same seed, same rank), loaded with
the engine's gathered parameters at the start of every step. Every forward of a target records
the weight it reads, in both models: the bits must be equal. The engine's averaged gradients of
the LoRA factors and the head must be the mean over the ranks of the reference's.

A case records what differed instead of raising, so that one spawn reports every case.
"""

from __future__ import annotations

import copy
import os
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_grad
from fsdp_cases import (
    MICRO,
    SEED,
    SIGMA,
    STEPS,
    TOTAL_STEPS,
    Case,
    Reference,
    Setup,
    _diff,
    average,
    build,
    micro_batches,
    reader,
)
from torch import Tensor, nn

import flatopt

LR = 1e-2
# The engine reduces the ranks' gradients in its own order (flat buckets): a few ulps from the
# reference's mean. The forwards' W + ε are compared bitwise.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@dataclass(frozen=True)
class DSCase:
    """One way to combine FlatPerturb with deepspeed.initialize."""

    name: str
    stage: int = 3
    # "before": FlatPerturb around the inner optimizer, then initialize(optimizer=inner);
    # "after": initialize(optimizer=inner), then FlatPerturb(inner, engine.module);
    # "engine": initialize, then FlatPerturb(engine.optimizer, engine.module);
    # "handed": FlatPerturb handed to initialize as its optimizer.
    order: str = "before"
    auto: bool = False
    accumulation: int = MICRO  # micro-batches per optimizer step (DeepSpeed's boundary)
    checkpointing: bool = False
    groups: int = 1  # param groups of the inner optimizer (2: the head apart, as HF Trainer)

    @property
    def steps(self) -> int:
        return STEPS


CASES = (
    DSCase("zero3_before"),
    DSCase("zero3_after", order="after"),
    DSCase("zero3_engine_optimizer", order="engine"),
    DSCase("zero3_handed_auto", order="handed", auto=True, groups=2),
    DSCase("zero3_before_auto", auto=True),
    DSCase("zero3_no_accumulation", accumulation=1),
    DSCase("zero3_checkpointing", checkpointing=True),
    DSCase("zero3_checkpointing_auto", checkpointing=True, auto=True, order="after"),
    DSCase("zero2_before", stage=2),
    DSCase("zero2_after", stage=2, order="after", groups=2),
    DSCase("zero2_handed_auto", stage=2, order="handed", auto=True, groups=2),
    DSCase("zero1_before", stage=1),
)


def config(case: DSCase) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": case.accumulation,
        "zero_optimization": {"stage": case.stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,  # a FlatPerturb handed to initialize
        "steps_per_print": 10**9,
    }


class Seen:
    """The weight each forward of a target reads, recorded inside the forward itself (after
    every pre-hook, DeepSpeed's and flatopt's, in whatever order they run)."""

    def __init__(self, net: nn.Module, names: list[str]):
        self.seen: dict[str, list[Tensor]] = {name: [] for name in names}
        for name in names:
            module = reader(net, name)
            module.forward = _Recording(module, module.forward, self.seen[name])

    def take(self) -> dict[str, list[Tensor]]:
        seen = {name: list(values) for name, values in self.seen.items()}
        for values in self.seen.values():
            values.clear()
        return seen


class _Recording:
    def __init__(self, module: nn.Module, forward: Any, into: list[Tensor]):
        self.module, self.forward, self.into = module, forward, into

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.into.append(self.module.weight.detach().clone())
        return self.forward(*args, **kwargs)


def _gathered(net: nn.Module) -> dict[str, Tensor]:
    params = list(net.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: p.detach().clone() for n, p in net.named_parameters()}


def _storage(net: nn.Module) -> dict[str, tuple[Tensor, int, int]]:
    """Each frozen tensor's stored values (a ZeRO-3 partition: its shard), version, address."""
    found = {}
    for n, p in net.named_parameters():
        if p.requires_grad:
            continue
        t = getattr(p, "ds_tensor", None)
        t = p if t is None else t
        found[n] = (t.detach().clone(), t._version, t.data_ptr())
    return found


class DSSetup(Setup):
    def __init__(self, case: DSCase):
        super().__init__(Case(case.name, auto=case.auto, checkpointing=case.checkpointing))
        self.accumulation = case.accumulation

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output.float(), target) / self.accumulation


def _inner(net: nn.Module, case: DSCase) -> torch.optim.Optimizer:
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if case.groups == 1:
        return torch.optim.AdamW([p for _, p in trainable], lr=LR)
    head = [p for n, p in trainable if n.startswith("head.")]
    rest = [p for n, p in trainable if not n.startswith("head.")]
    groups = [{"params": rest}, {"params": head, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR)


def _wrap(optimizer: Any, net: nn.Module, case: DSCase) -> flatopt.FlatPerturb:
    return flatopt.FlatPerturb(
        optimizer,
        net,
        sigma=SIGMA,
        schedule="cosine",
        total_steps=TOTAL_STEPS,
        seed=SEED,
        adapters=[flatopt.dense(net.head)],
        auto=case.auto,
    )


def build_engine(case: DSCase, net: nn.Module):
    """``net`` under DeepSpeed's engine, and the FlatPerturb, built in the case's order."""
    inner = _inner(net, case)
    cfg = config(case)
    if case.order == "before":
        opt = _wrap(inner, net, case)
        engine, *_ = deepspeed.initialize(model=net, optimizer=inner, config=cfg)
    elif case.order == "handed":
        opt = _wrap(inner, net, case)
        engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    else:
        engine, *_ = deepspeed.initialize(model=net, optimizer=inner, config=cfg)
        outer = engine.optimizer if case.order == "engine" else inner
        opt = _wrap(outer, engine.module, case)
    return engine, opt


def run_case(case: DSCase) -> dict[str, Any]:
    net = build("lora")
    net.checkpointing = case.checkpointing
    unsharded = copy.deepcopy(net)
    engine, opt = build_engine(case, net)
    names = [name for name, _ in opt.targets]
    setup = DSSetup(case)
    ref = Reference(unsharded, setup, torch.float32, names)
    seen = Seen(engine.module, names)
    frozen = _storage(engine.module)
    report: dict[str, Any] = {
        "targets": opt.targets,
        "ref_targets": ref.opt.targets,
        "compared": 0,
        "seen": [],
        "noiseless": [],
        "grads": [],
        "grad_max_diff": 0.0,
        "sigmas": [],
        "num_steps": [],
        "first_seen": [],
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_steps(case, engine, opt, ref, seen, names, report)
    report["stuck"] = stuck_warnings(caught)
    moved = []
    for n, (value, version, ptr) in frozen.items():
        now = _storage(engine.module)[n]
        if not torch.equal(now[0], value):
            moved.append(f"{n}: values changed")
        if now[1] != version or now[2] != ptr:
            moved.append(f"{n}: version {version} -> {now[1]} or new storage")
    report.update(frozen_moved=moved, frozen_count=len(frozen))
    engine.destroy()
    return report


def _run_steps(case, engine, opt, ref, seen, names, report) -> None:
    rank = dist.get_rank()
    for step in range(case.steps):
        report["sigmas"].append(opt.sigma)
        ref.load(_gathered(engine.module))
        ref_grads = []
        batches = micro_batches(rank, step)[: case.accumulation]
        for index, (x, y) in enumerate(batches):
            if case.auto:
                engine.backward(F.mse_loss(engine(x), y))
            else:
                with opt.perturbed():
                    engine.backward(F.mse_loss(engine(x), y))
            ours = seen.take()
            if index == 0:
                report["first_seen"].append(ours[names[0]][0])
            ref_grads.append(ref.micro_batch(x, y))
            _compare_seen(report, step, index, ours, ref.seen.take(), ref, opt.sigma, names)
            if index == len(batches) - 1:
                _compare_grads(report, step, engine.module, ref_grads)
            engine.step()
        ref.step()
        report["num_steps"].append(opt.num_steps)


def _compare_seen(report, step, index, ours, theirs, ref, sigma, names) -> None:
    for name in names:
        where = f"step {step}, micro-batch {index}, {name!r}"
        if not ours[name] or not theirs[name]:
            report["seen"].append(f"{where}: {len(ours[name])} forwards vs {len(theirs[name])}")
            continue
        want = theirs[name][0]
        for call, got in enumerate(ours[name]):  # a checkpointed forward runs again in backward
            report["compared"] += 1
            if not (got.dtype == want.dtype and torch.equal(got, want)):
                report["seen"].append(f"{where}, call {call}: {_diff(got, want)}")
        clean = reader(ref.model, name).weight
        if sigma > 0 and torch.equal(want, clean):
            report["noiseless"].append(where)


def _compare_grads(report, step, net, ref_grads) -> None:
    total = dict(ref_grads[0])
    for grads in ref_grads[1:]:
        total = {n: total[n] + grads[n] for n in total}
    want = average(total, None)
    for n, p in net.named_parameters():
        if not p.requires_grad:
            continue
        got = safe_get_full_grad(p)
        if got is None:
            report["grads"].append(f"step {step}, {n}: gradient missing")
            continue
        got = got.float()
        report["grad_max_diff"] = max(
            report["grad_max_diff"], (got.double() - want[n].double()).abs().max().item()
        )
        try:
            torch.testing.assert_close(got, want[n], **TOLERANCE)
        except AssertionError as error:
            report["grads"].append(f"step {step}, {n}: {' '.join(str(error).split())[:200]}")


def guarded(fn, *args) -> dict[str, Any]:
    try:
        return {"error": None, **fn(*args)}
    except Exception:
        return {"error": traceback.format_exc()}


def deepspeed_env(rank: int, world: int) -> None:
    """What DeepSpeed reads of the launcher's environment; the process group already exists."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))


# -- resume: engine.save_checkpoint / load_checkpoint ---------------------------------------

RESUME_AT = 2  # steps before the checkpoint; the run goes on to STEPS
RESUMED = (
    DSCase("zero3_before", order="before"),
    DSCase("zero3_handed_auto", order="handed", auto=True, groups=2),
    DSCase("zero2_after", stage=2, order="after", groups=2),
)


def _train(engine, opt, case: DSCase, seen: Seen, steps: range) -> list[dict[str, list[Tensor]]]:
    """``steps`` optimizer steps of the case's loop; the weights each step's forwards read."""
    rank, reads = dist.get_rank(), []
    for step in steps:
        for x, y in micro_batches(rank, step)[: case.accumulation]:
            if case.auto:
                engine.backward(F.mse_loss(engine(x), y))
            else:
                with opt.perturbed():
                    engine.backward(F.mse_loss(engine(x), y))
            engine.step()
        reads.append(seen.take())
    return reads


def run_resume(case: DSCase, directory: str) -> dict[str, Any]:
    """An uninterrupted run of STEPS steps, and one that saves the engine's checkpoint after
    RESUME_AT steps; a fresh engine and FlatPerturb load it and go on. The resumed steps must
    read bitwise the same W + ε and end with bitwise the same trainable parameters."""
    runs = []
    for resumed in (False, True):
        net = build("lora")
        engine, opt = build_engine(case, net)
        names = [name for name, _ in opt.targets]
        seen = Seen(engine.module, names)
        if resumed:
            engine.load_checkpoint(directory, tag="resume")
            at = opt.num_steps
            reads = _train(engine, opt, case, seen, range(RESUME_AT, STEPS))
        else:
            reads = _train(engine, opt, case, seen, range(RESUME_AT))
            engine.save_checkpoint(directory, tag="resume")
            saved = torch.load(
                f"{directory}/resume/{_optim_file(case, dist.get_rank())}", weights_only=False
            )["optimizer_state_dict"]
            entry = _inner_state(saved, case.stage).get("flatopt")
            reads += _train(engine, opt, case, seen, range(RESUME_AT, STEPS))
        trained = {n: p for n, p in _gathered(engine.module).items() if p.requires_grad}
        runs.append((reads, trained, opt.num_steps, opt.sigma))
        engine.destroy()
    (full, trained, steps, sigma), (tail, trained_resumed, steps_resumed, sigma_resumed) = runs
    differ = []
    for offset, (want, got) in enumerate(zip(full[RESUME_AT:], tail)):
        for name in want:
            if len(want[name]) != len(got[name]) or not all(
                torch.equal(a, b) for a, b in zip(want[name], got[name])
            ):
                differ.append(f"step {RESUME_AT + offset}, {name!r}: W + ε differs")
    for name in trained:
        if not torch.equal(trained[name], trained_resumed[name]):
            differ.append(f"{name}: trained parameter differs after resuming")
    return {
        "saved_entry": entry,
        "loaded_at": at,
        "steps": (steps, steps_resumed),
        "sigmas": (sigma, sigma_resumed),
        "differ": differ,
        "resumed_reads": sum(len(v) for step in tail for v in step.values()),
    }


def _optim_file(case: DSCase, rank: int) -> str:
    """The file of this rank's ZeRO optimizer state in a checkpoint (every stage)."""
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def _inner_state(saved: dict[str, Any], stage: int) -> dict[str, Any]:
    """The torch optimizer's state dict inside what a ZeRO optimizer saved."""
    return saved["optimizer_state_dict"] if stage == 3 else saved["base_optimizer_state"]


STUCK = "counted no step"  # flatopt's warning that something else trains the model


def stuck_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if STUCK in str(w.message)]


def run_foreign_optimizer(stage: int) -> dict[str, Any]:
    """DeepSpeed builds its own optimizer from the config's "optimizer" section and trains the
    model with it, while the FlatPerturb wraps another one: flatopt must say it is stuck."""
    case = DSCase(f"foreign_zero{stage}", stage=stage, auto=True)
    net = build("lora")
    opt = _wrap(_inner(net, case), net, case)
    cfg = config(case)
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": LR, "torch_adam": True}}
    trainable = [p for p in net.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=net, model_parameters=trainable, config=cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            for x, y in micro_batches(dist.get_rank(), step)[: case.accumulation]:
                engine.backward(F.mse_loss(engine(x), y))
                engine.step()
    report = {"stuck": stuck_warnings(caught), "num_steps": opt.num_steps}
    engine.destroy()
    return report


def run_step_while_armed(order: str) -> dict[str, Any]:
    """engine.step() inside ``with opt.perturbed():`` raises flatopt's error for the engine and
    leaves nothing perturbed (the inner optimizer handed to initialize, or the FlatPerturb)."""
    case = DSCase(f"armed_{order}", order=order, accumulation=1)
    engine, opt = build_engine(case, build("lora"))
    x, y = micro_batches(dist.get_rank(), 0)[0]
    message = None
    try:
        with opt.perturbed():
            engine.backward(F.mse_loss(engine(x), y))
            engine.step()
    except RuntimeError as error:
        message = str(error)
    report = {"message": message, "perturbed": opt.is_perturbed, "num_steps": opt.num_steps}
    engine.destroy()
    return report
