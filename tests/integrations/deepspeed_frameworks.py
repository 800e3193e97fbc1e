"""What each rank runs for the framework cases of tests/integrations/test_deepspeed.py: the tiny
peft GPT-2 of `trainer_checks` under ZeRO-3, trained by the HF Trainer (a DeepSpeed config,
``trainer_optimizer``, ``auto=True``), resumed from the Trainer's DeepSpeed checkpoint, and
trained by an Accelerate loop with Accelerate's DeepSpeed plugin.

`StepCheck` holds an unsharded copy of the model with its own FlatPerturb (same seed, same
rank, σ schedule and step count). At the start of every optimizer step it loads the engine's
gathered parameters and runs one perturbed forward; every training forward of a target in the
DeepSpeed run must then read bitwise that W + ε. The frozen partitions must stay bitwise,
version- and storage-identical.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
import transformers
from deepspeed_cases import _gathered, _storage
from torch import Tensor, nn
from trainer_checks import sequences, tiny_gpt2, trainable

import flatopt

SIGMA = 0.2
STEPS = 3  # optimizer steps of every run; the Trainer saves a checkpoint after SAVE_AT
SAVE_AT = 2
MICRO, ACCUM = 2, 2  # sequences per micro-batch and rank, micro-batches per optimizer step
SEED = 0  # the Trainer's args.seed, which trainer_optimizer takes as the noise seed
LR = 1e-2


def zero3_config(**sizes: Any) -> dict[str, Any]:
    """ZeRO-3 with every weight partitioned (the threshold keeps none whole)."""
    return {
        "train_micro_batch_size_per_gpu": sizes.get("micro", "auto"),
        "gradient_accumulation_steps": sizes.get("accumulation", "auto"),
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,  # the FlatPerturb is the engine's optimizer
        "steps_per_print": 10**9,
    }


def base_layer(model: nn.Module, name: str) -> nn.Module:
    """The module whose forward reads a peft target's weight: its base layer."""
    return model.get_submodule(name).get_base_layer()


class _Recording:
    """Wraps a module's forward: a copy of the weight it reads, after every pre-hook."""

    def __init__(self, module: nn.Module, into: list[Tensor]):
        self.module, self.forward, self.into = module, module.forward, into

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.module.training:
            self.into.append(self.module.weight.detach().clone())
        return self.forward(*args, **kwargs)


class StepCheck:
    """The W + ε each training forward of a target reads, against an unsharded reference."""

    def __init__(self, model: nn.Module):
        self.reference = copy.deepcopy(model)  # before DeepSpeed partitions ``model``
        inner = torch.optim.SGD(trainable(self.reference), lr=0.0)
        self.flat = flatopt.FlatPerturb(
            inner, self.reference, sigma=SIGMA, total_steps=STEPS, seed=SEED
        )
        self.names = [name for name, _ in self.flat.targets]
        self.seen = self._record(model)
        self.ref_seen = self._record(self.reference)
        self.want: dict[str, Tensor] = {}
        self.clean: dict[str, Tensor] = {}
        self.report: dict[str, Any] = {
            "compared": 0,
            "seen": [],
            "noiseless": [],
            "sigmas": [],
            "frozen_moved": [],
            "frozen_count": 0,
        }
        self.frozen: dict[str, Any] = {}

    def _record(self, model: nn.Module) -> dict[str, list[Tensor]]:
        seen: dict[str, list[Tensor]] = {name: [] for name in self.names}
        for name in self.names:
            module = base_layer(model, name)
            module.forward = _Recording(module, seen[name])
        return seen

    def start(self, steps_done: int = 0) -> None:
        """Before the first step: the reference at the same step."""
        if steps_done:  # a resumed run: the reference's schedule starts where it resumes
            state = self.flat.state_dict()
            state["flatopt"]["num_steps"] = steps_done
            self.flat.load_state_dict(state)
        for values in self.seen.values():
            values.clear()

    def begin(self, model: nn.Module) -> None:
        """At the start of an optimizer step: the reference's W + ε from the engine's weights."""
        with torch.no_grad():
            gathered = _gathered(model)
            for name, p in self.reference.named_parameters():
                p.copy_(gathered[name])
        with self.flat.perturbed():
            self.reference(input_ids=torch.zeros(1, 4, dtype=torch.long))
        self.want = {name: values.pop() for name, values in self.ref_seen.items()}
        self.clean = {n: base_layer(self.reference, n).weight.detach().clone() for n in self.names}
        self.report["sigmas"].append(self.flat.sigma)
        self.frozen = _storage(model)

    def end(self, model: nn.Module) -> None:
        """After the step: every forward of the step read the reference's W + ε, and the frozen
        partitions are as they were (checkpoints, between steps, may rewrite them)."""
        step = self.flat.num_steps
        now = _storage(model)
        for name, (value, version, ptr) in self.frozen.items():
            if not torch.equal(now[name][0], value) or now[name][1:] != (version, ptr):
                self.report["frozen_moved"].append(f"step {step}, {name}")
        self.report["frozen_count"] = len(self.frozen)
        for name in self.names:
            reads, want = self.seen[name], self.want[name]
            if not reads:
                self.report["seen"].append(f"step {step}, {name!r}: no training forward")
            for call, got in enumerate(reads):
                self.report["compared"] += 1
                if not (got.dtype == want.dtype and torch.equal(got, want)):
                    self.report["seen"].append(f"step {step}, {name!r}, call {call}: differs")
            reads.clear()
            if self.flat.sigma > 0 and torch.equal(want, self.clean[name]):
                self.report["noiseless"].append(f"step {step}, {name!r}")
        self.flat.step()

    def finish(self, model: nn.Module, flat: flatopt.FlatPerturb) -> dict[str, Any]:
        trained = {n: p for n, p in _gathered(model).items() if p.requires_grad}
        return {
            **self.report,
            "num_steps": flat.num_steps,
            "sigma": flat.sigma,
            "trained": trained,
        }


def _flatopt_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if "FlatPerturb" in str(w.message)]


# -- the HF Trainer with a DeepSpeed config ---------------------------------------------------


class _TrainerSteps(transformers.TrainerCallback):
    def __init__(self, check: StepCheck, model: nn.Module):
        self.check, self.model = check, model
        self.flat: Any = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        # Accelerate's wrapper around DeepSpeed's ZeRO optimizer around the FlatPerturb.
        self.flat = flatopt.unwrap(optimizer)
        self.check.start(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.check.begin(self.model)

    def on_step_end(self, args, state, control, **kwargs):
        self.check.end(self.model)


def trainer_args(directory: str) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=directory,
        deepspeed=zero3_config(),  # "auto": the Trainer fills in the sizes below
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=SAVE_AT,
        ddp_backend="gloo",
        report_to=[],
        disable_tqdm=True,
        logging_strategy="no",
        seed=SEED,
    )


def run_trainer(directory: str, resume: bool) -> dict[str, Any]:
    """HF Trainer + DeepSpeed ZeRO-3 with ``optimizer_cls_and_kwargs=trainer_optimizer(...)``:
    STEPS steps saving a checkpoint after SAVE_AT, or (``resume``) a fresh Trainer resuming from
    that checkpoint."""
    model = tiny_gpt2()
    args = trainer_args(directory)
    check = StepCheck(model)
    callback = _TrainerSteps(check, model)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": s, "labels": s} for s in sequences(8, seed=1)],
        optimizer_cls_and_kwargs=flatopt.integrations.trainer_optimizer(model, args, sigma=SIGMA),
        callbacks=[callback],
    )
    checkpoint = os.path.join(directory, f"checkpoint-{SAVE_AT}") if resume else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=checkpoint)
    flat = callback.flat
    report = check.finish(model, flat)
    report["targets"] = [name for name, _ in flat.targets]
    report["ref_targets"] = check.names
    report["warnings"] = _flatopt_warnings(caught)
    report["engine_optimizer"] = type(trainer.model_wrapped.optimizer.optimizer).__name__
    if not resume:
        rank = dist.get_rank()
        path = f"{directory}/checkpoint-{SAVE_AT}/global_step{SAVE_AT}"
        saved = torch.load(
            f"{path}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False
        )
        report["saved_entry"] = saved["optimizer_state_dict"]["optimizer_state_dict"]["flatopt"]
    trainer.accelerator.free_memory()
    return report


def run_trainer_handed_optimizers(directory: str) -> dict[str, Any]:
    """``optimizers=(FlatPerturb(...), None)`` under DeepSpeed: the Trainer drops it for an
    optimizer it builds itself (transformers' deepspeed_init), which then trains the model
    while the FlatPerturb never steps. flatopt must say so."""
    model = tiny_gpt2()
    inner = torch.optim.AdamW(trainable(model), lr=LR)
    flat = flatopt.FlatPerturb(inner, model, sigma=SIGMA, total_steps=STEPS, seed=SEED, auto=True)
    args = trainer_args(directory)
    args.save_strategy = "no"
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": s, "labels": s} for s in sequences(8, seed=1)],
        optimizers=(flat, None),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    report = {
        "warnings": _flatopt_warnings(caught),
        "num_steps": flat.num_steps,
        "engine_optimizer": type(trainer.model_wrapped.optimizer.optimizer).__name__,
    }
    trainer.accelerator.free_memory()
    return report


# -- Accelerate's DeepSpeed plugin --------------------------------------------------------------


def run_accelerate() -> dict[str, Any]:
    """An Accelerate loop over ``accelerator.prepare(model, FlatPerturb(..., auto=True))`` with
    Accelerate's DeepSpeed plugin (ZeRO-3), ``accelerator.accumulate`` over ACCUM micro-batches."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # without it the plugin is ignored on CPU
    model = tiny_gpt2()
    check = StepCheck(model)
    inner = torch.optim.AdamW(trainable(model), lr=LR)
    flat = flatopt.FlatPerturb(inner, model, sigma=SIGMA, total_steps=STEPS, seed=SEED, auto=True)
    plugin = DeepSpeedPlugin(hf_ds_config=zero3_config(micro=MICRO, accumulation=ACCUM))
    accelerator = Accelerator(
        deepspeed_plugin=plugin,
        gradient_accumulation_steps=ACCUM,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )
    engine, optimizer = accelerator.prepare(model, flat)
    assert flatopt.unwrap(optimizer) is flat  # through Accelerate's and DeepSpeed's wrappers
    check.start()
    data = torch.tensor(sequences(STEPS * ACCUM * MICRO, seed=10 + dist.get_rank()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            check.begin(model)
            for micro in range(ACCUM):
                ids = data[(step * ACCUM + micro) * MICRO :][:MICRO]
                with accelerator.accumulate(engine):
                    accelerator.backward(engine(input_ids=ids, labels=ids).loss)
                    optimizer.step()
                    optimizer.zero_grad()
            check.end(model)
    report = check.finish(model, flat)
    report["targets"] = [name for name, _ in flat.targets]
    report["ref_targets"] = check.names
    report["warnings"] = _flatopt_warnings(caught)
    report["engine_optimizer"] = type(engine.optimizer.optimizer).__name__
    accelerator.free_memory()
    return report


def fresh_frameworks() -> None:
    """Accelerate's process-wide state, and the DeepSpeed config transformers remembers."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    unset_hf_deepspeed_config()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
