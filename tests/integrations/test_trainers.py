"""flatopt inside trainers that own the loop: transformers.Trainer, TRL's SFTTrainer,
pytorch-lightning (automatic and manual optimization), Lightning Fabric and Accelerate; the
Trainer building its own optimizer under flatopt (``flatopt.integrations.trainer_optimizer``);
and ``flatopt.sharpness`` between the steps of a loop, on loralib's merging layers.

Each test trains the tiny peft GPT-2 of `trainer_checks` a few steps and checks, with a forward
pre-hook registered on every target after FlatPerturb was built:

- every training forward of every target read W + ε, one ε per step; every eval forward read
  the clean W object;
- the frozen weights are bitwise, version- and storage-identical afterwards;
- the run is bitwise the explicit loop's (same seed, ``perturb()``/``restore()`` by hand):
  the tensors each forward read, the losses and the trained LoRA factors;
- flatopt warns exactly where a step would go unperturbed, and nowhere else.

Each test prints one ``counts`` line: what the observing hook saw in training and evaluation.
"""

from __future__ import annotations

import itertools
import re
from contextlib import nullcontext
from importlib.metadata import version
from pathlib import Path

import accelerate
import lightning_fabric
import loralib
import pytest
import pytorch_lightning as pl
import torch
import transformers
import trl
from accelerate.state import AcceleratorState, GradientState
from datasets import Dataset
from helpers import bits_equal
from torch.utils.data import DataLoader
from trainer_checks import (
    SEED,
    SIGMA,
    TARGETS,
    Frozen,
    Observer,
    assert_same_reads,
    assert_same_tensors,
    flatopt_warnings,
    recorded_warnings,
    sequences,
    tiny_gpt2,
    tokenizer,
    trainable,
)

import flatopt

STEPS, ACCUM, BATCH = 3, 2, 2
TRAIN, EVAL = 8, 4  # sequences: 4 micro-batches (2 steps) per epoch; 2 eval batches
LR = 1e-2


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test builds its own Accelerator."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def build(mode: str, resample: str = "step"):
    """(model, optimizer, FlatPerturb or None, observer, frozen) for one run.

    ``mode``: "auto" (auto=True), "explicit" (perturb()/restore() by hand) or "plain" (the
    bare AdamW, no FlatPerturb at all).
    """
    model = tiny_gpt2()
    inner = torch.optim.AdamW(trainable(model), lr=LR)
    frozen = Frozen(model)
    if mode == "plain":
        return model, inner, None, None, frozen
    flat = flatopt.FlatPerturb(
        inner,
        model,
        sigma=SIGMA,
        schedule="constant",
        seed=SEED,
        resample=resample,
        auto=mode == "auto",
    )
    return model, flat, flat, Observer(flat, model), frozen


def lora_factors(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainable(model)]


def report(framework: str, counts: dict[str, int]) -> None:
    print(f"counts {framework}: {counts}")


# -- transformers.Trainer and TRL's SFTTrainer -------------------------------------------------


def lm_dataset(count: int, seed: int) -> list[dict[str, list[int]]]:
    return [{"input_ids": ids, "labels": ids} for ids in sequences(count, seed)]


class ExplicitTrainer(transformers.Trainer):
    """The explicit loop inside the Trainer: each micro-batch's forward and backward perturbed."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        with flatopt.unwrap(self.optimizer).perturbed():
            return super().training_step(model, inputs, num_items_in_batch)


class ExplicitSFTTrainer(trl.SFTTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        with flatopt.unwrap(self.optimizer).perturbed():
            return super().training_step(model, inputs, num_items_in_batch)


HF_ARGS = dict(
    per_device_train_batch_size=BATCH,
    per_device_eval_batch_size=BATCH,
    gradient_accumulation_steps=ACCUM,
    max_steps=STEPS,
    learning_rate=LR,
    logging_steps=1,
    eval_strategy="steps",
    eval_steps=2,  # one evaluation mid-training, between steps 2 and 3
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    seed=0,
    disable_tqdm=True,
)


def history(trainer) -> list[dict]:
    """The Trainer's log without its wall-clock entries."""
    timing = re.compile(r"runtime|per_second|flos")
    return [
        {k: v for k, v in row.items() if not timing.search(k)} for row in trainer.state.log_history
    ]


def run_hf(tmp_path: Path, mode: str, trainer_cls=transformers.Trainer):
    model, optimizer, _, observer, frozen = build(mode)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / mode), **HF_ARGS)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=lm_dataset(TRAIN, seed=1),
        eval_dataset=lm_dataset(EVAL, seed=2),
        optimizers=(optimizer, None),
    )
    with recorded_warnings() as caught:
        trainer.train()
        trainer.evaluate()
    frozen.check()
    return trainer, model, observer, flatopt_warnings(caught)


# Training: STEPS x ACCUM micro-batches. Evaluation: EVAL // BATCH batches after step 2, after
# the last step (the Trainer evaluates at the end under eval_strategy="steps") and in evaluate().
HF_TRAIN_READS = STEPS * ACCUM * TARGETS
HF_EVAL_READS = 3 * (EVAL // BATCH) * TARGETS


def test_hf_trainer_auto_is_the_explicit_loop_and_evaluates_on_the_clean_weights(tmp_path):
    trainer, model, observer, warned = run_hf(tmp_path, "auto")
    counts = observer.check(train=HF_TRAIN_READS, eval=HF_EVAL_READS, steps=STEPS)
    assert warned == []
    assert trainer.state.global_step == STEPS

    ref_trainer, ref_model, ref_observer, ref_warned = run_hf(tmp_path, "explicit", ExplicitTrainer)
    assert ref_warned == []
    assert_same_reads(observer.reads, ref_observer.reads)
    assert history(trainer) == history(ref_trainer)
    assert_same_tensors(lora_factors(model), lora_factors(ref_model))

    plain_trainer, *_ = run_hf(tmp_path, "plain")
    losses = [row["loss"] for row in history(trainer) if "loss" in row]
    plain = [row["loss"] for row in history(plain_trainer) if "loss" in row]
    assert len(losses) == STEPS and losses != plain  # the noise changed the training
    report(f"transformers {transformers.__version__} Trainer", counts)


def test_hf_trainer_with_explicit_mode_warns_once_that_nothing_was_perturbed(tmp_path):
    _, _, observer, warned = run_hf(tmp_path, "explicit")  # the plain Trainer: nobody perturbs
    assert len(warned) == 1 and "auto=True" in warned[0], warned
    counts = observer.counts()
    assert counts == {
        "train": HF_TRAIN_READS,
        "train_perturbed": 0,
        "eval": HF_EVAL_READS,
        "eval_perturbed": 0,
    }
    report(f"transformers {transformers.__version__} Trainer, explicit mode", counts)


def test_hf_trainer_auto_resumes_from_a_checkpoint_bit_for_bit(tmp_path):
    """The Trainer saves ``optimizer.state_dict()`` (flatopt's seed and step count included)
    and loads it into a fresh FlatPerturb through the AcceleratedOptimizer on resume."""
    args = {**HF_ARGS, "eval_strategy": "no", "save_strategy": "steps", "save_steps": 2}

    def trainer(model, optimizer):
        return transformers.Trainer(
            model=model,
            args=transformers.TrainingArguments(output_dir=str(tmp_path), **args),
            train_dataset=lm_dataset(TRAIN, seed=1),
            optimizers=(optimizer, None),
        )

    model, optimizer, _, observer, _ = build("auto")
    trainer(model, optimizer).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert checkpoint.is_dir()

    resumed, optimizer, flat_resumed, observer_resumed, frozen = build("auto")
    with recorded_warnings() as caught:
        trainer(resumed, optimizer).train(resume_from_checkpoint=str(checkpoint))
    assert flatopt_warnings(caught) == []
    frozen.check()
    assert flat_resumed.num_steps == STEPS
    last = [read for read in observer.train_reads if read.step == STEPS - 1]
    assert len(last) == ACCUM * TARGETS
    assert_same_reads(observer_resumed.train_reads, last)
    assert_same_tensors(lora_factors(resumed), lora_factors(model))


# -- the Trainer building its own optimizer: flatopt.integrations.trainer_optimizer -------------

# Weight decay on, so that the Trainer's two parameter groups differ.
FACTORY_ARGS = {**HF_ARGS, "weight_decay": 0.1}


def trainable_norm(model) -> list[torch.nn.Parameter]:
    """Train the final LayerNorm too: the Trainer puts it in its no-decay group."""
    params = list(model.base_model.model.transformer.ln_f.parameters())
    for param in params:
        param.requires_grad_(True)
    return params


class ObserveBuilt(transformers.TrainerCallback):
    """Puts an `Observer` on the FlatPerturb the Trainer built, at the start of training: after
    flatopt's hooks exist (the observer's must come after them), before the first forward."""

    def __init__(self, model):
        self.model = model
        self.flat = self.observer = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.flat = flatopt.unwrap(optimizer)
        self.observer = Observer(self.flat, self.model)


def run_factory(tmp_path: Path, name: str, resume=None, seed=SEED, norm=True, **overrides):
    """A Trainer that builds its own optimizer through trainer_optimizer; (trainer, model,
    callback, flatopt's warnings). ``norm``: train the final LayerNorm too."""
    model = tiny_gpt2()
    if norm:
        trainable_norm(model)
    frozen = Frozen(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), **{**FACTORY_ARGS, **overrides}
    )
    observe = ObserveBuilt(model)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=lm_dataset(TRAIN, seed=1),
        eval_dataset=lm_dataset(EVAL, seed=2),
        optimizer_cls_and_kwargs=flatopt.integrations.trainer_optimizer(
            model, args, sigma=SIGMA, schedule="constant", seed=seed
        ),
        callbacks=[observe],
    )
    with recorded_warnings() as caught:
        trainer.train(resume_from_checkpoint=resume)
        if args.eval_strategy != "no":
            trainer.evaluate()
    frozen.check()
    return trainer, model, observe, flatopt_warnings(caught)


def run_own_optimizer_explicit(tmp_path: Path):
    """The reference: the Trainer's own optimizer (``create_optimizer()``) wrapped by hand in an
    explicit FlatPerturb, ``perturbed()`` around each micro-batch."""
    model = tiny_gpt2()
    trainable_norm(model)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "reference"), **FACTORY_ARGS)
    trainer = ExplicitTrainer(
        model=model,
        args=args,
        train_dataset=lm_dataset(TRAIN, seed=1),
        eval_dataset=lm_dataset(EVAL, seed=2),
    )
    own = trainer.create_optimizer()
    flat = flatopt.FlatPerturb(own, model, sigma=SIGMA, schedule="constant", seed=SEED)
    trainer.optimizer = flat
    observer = Observer(flat, model)
    with recorded_warnings() as caught:
        trainer.train()
        trainer.evaluate()
    return trainer, model, observer, flatopt_warnings(caught)


def test_hf_trainer_builds_its_own_optimizer_under_flatopt_as_the_explicit_loop(tmp_path):
    trainer, model, observe, warned = run_factory(tmp_path, "factory")
    assert warned == []
    flat, args = observe.flat, trainer.args
    assert flat.auto and len(flat.targets) == TARGETS and flat.seed == SEED
    # The optimizer args.optim names, with the Trainer's settings ...
    own_cls, own_kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
    assert type(flat.optimizer) is own_cls
    assert {key: flat.optimizer.defaults[key] for key in own_kwargs} == own_kwargs
    # ... over the Trainer's groups: weight decay on the LoRA factors, none on the LayerNorm.
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    norm = {id(p) for p in model.base_model.model.transformer.ln_f.parameters()}
    groups = [({id(p) for p in g["params"]}, g["weight_decay"]) for g in flat.param_groups]
    assert groups == [(lora, 0.1), (norm, 0.0)]
    # The Trainer's LR schedule reached the groups (linear decay, to 0 after the last step).
    assert trainer.lr_scheduler.get_last_lr() == [g["lr"] for g in flat.param_groups] == [0, 0]
    assert next(row["learning_rate"] for row in history(trainer) if "loss" in row) == LR

    counts = observe.observer.check(train=HF_TRAIN_READS, eval=HF_EVAL_READS, steps=STEPS)
    ref_trainer, ref_model, ref_observer, ref_warned = run_own_optimizer_explicit(tmp_path)
    assert ref_warned == []
    assert_same_reads(observe.observer.reads, ref_observer.reads)
    assert history(trainer) == history(ref_trainer)
    assert_same_tensors(trainable(model), trainable(ref_model))
    report(f"transformers {transformers.__version__} Trainer, trainer_optimizer", counts)


def test_hf_trainer_with_trainer_optimizer_resumes_from_a_checkpoint_bit_for_bit(tmp_path):
    """The resumed Trainer builds a fresh FlatPerturb, with another seed even, and loads the
    checkpoint's optimizer state into it: the noise continues where the run stopped."""
    # Only the LoRA factors train: the checkpoint of a peft model holds the adapter alone.
    save = {"eval_strategy": "no", "save_strategy": "steps", "save_steps": 2, "norm": False}
    _, model, observe, _ = run_factory(tmp_path, "full", **save)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert checkpoint.is_dir()

    _, resumed, observe_resumed, warned = run_factory(
        tmp_path, "resumed", resume=str(checkpoint), seed=SEED + 1, **save
    )
    # The seed given to the fresh wrapper is replaced by the checkpoint's, and load says so.
    assert len(warned) == 1 and f"seed: this FlatPerturb's {SEED + 1}" in str(warned[0])
    assert observe_resumed.flat.num_steps == STEPS and observe_resumed.flat.seed == SEED
    last = [read for read in observe.observer.train_reads if read.step == STEPS - 1]
    assert len(last) == ACCUM * TARGETS
    assert_same_reads(observe_resumed.observer.train_reads, last)
    assert_same_tensors(trainable(resumed), trainable(model))


def test_trainer_optimizer_keeps_the_trainers_choice_of_optimizer(tmp_path):
    model = tiny_gpt2()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        **{**FACTORY_ARGS, "optim": "sgd", "optim_args": "momentum=0.9", "eval_strategy": "no"},
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=lm_dataset(TRAIN, seed=1),
        optimizer_cls_and_kwargs=flatopt.integrations.trainer_optimizer(model, args),
    )
    flat = trainer.create_optimizer()
    assert isinstance(flat, flatopt.FlatPerturb) and flat.auto
    assert type(flat.optimizer) is torch.optim.SGD
    assert flat.optimizer.defaults["momentum"] == 0.9 and flat.optimizer.defaults["lr"] == LR
    assert flat.seed == args.seed  # no seed given: the Trainer's
    assert flat.state_dict()["flatopt"]["total_steps"] == STEPS  # args.max_steps


@pytest.mark.parametrize(
    ("overrides", "kwargs", "error", "match"),
    [
        ({"max_steps": -1}, {}, ValueError, r"needs total_steps, and args\.max_steps is -1"),
        ({}, {"sigma": -0.1}, ValueError, r"Invalid sigma: -0\.1"),
        ({}, {"schedule": "warmup"}, ValueError, r"Invalid schedule: 'warmup'"),
    ],
)
def test_trainer_optimizer_refuses_bad_arguments_before_training(
    tmp_path, overrides, kwargs, error, match
):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), **{**HF_ARGS, **overrides})
    with pytest.raises(error, match=match):
        flatopt.integrations.trainer_optimizer(tiny_gpt2(), args, **kwargs)


def test_trainer_optimizer_refuses_what_is_not_training_arguments_or_a_lora_model(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), **HF_ARGS)
    with pytest.raises(TypeError, match=r"Invalid args: dict has no max_steps"):
        flatopt.integrations.trainer_optimizer(tiny_gpt2(), dict(HF_ARGS))
    with pytest.raises(ValueError, match="No adapter recognised"):
        flatopt.integrations.trainer_optimizer(torch.nn.Linear(2, 2), args)
    # Training by epochs works with total_steps given, or with a constant schedule.
    epochs = transformers.TrainingArguments(
        output_dir=str(tmp_path), **{**HF_ARGS, "max_steps": -1}
    )
    _, kwargs = flatopt.integrations.trainer_optimizer(tiny_gpt2(), epochs, total_steps=5)
    assert kwargs["total_steps"] == 5
    _, kwargs = flatopt.integrations.trainer_optimizer(tiny_gpt2(), epochs, schedule="constant")
    assert kwargs["total_steps"] is None


# -- sharpness between the steps of a loop, on loralib's merging layers --------------------------


def loralib_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        loralib.Linear(6, 8, r=2, lora_alpha=4), torch.nn.Tanh(), loralib.Linear(8, 3, r=2)
    )
    loralib.mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_()  # loralib starts B at 0: the merge would change nothing
    return model


def test_sharpness_between_steps_leaves_loralib_layers_unmerged_and_training():
    """sharpness(eval_mode=True) between two auto steps is the evaluation a loop runs there
    (``model.eval()``, measure, ``model.train()``): loralib merges on eval and unmerges on
    train, and the next step is the one the loop would take after that evaluation."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(3)]

    def loss(model):
        return lambda batch: torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    runs = []
    for measure in (True, False):
        model = loralib_model()
        opt = flatopt.FlatPerturb(
            torch.optim.SGD(trainable(model), lr=0.1),
            model,
            sigma=SIGMA,
            schedule="constant",
            seed=SEED,
            auto=True,
        )
        loss(model)(data[0]).backward()
        opt.step()
        opt.zero_grad()
        if measure:
            result = flatopt.sharpness(model, loss(model), data[1:2], sigma=0.1, samples=2)
            assert not opt.is_perturbed and opt.num_steps == 1
        else:  # the evaluation sharpness stands for, by hand
            model.eval()
            with torch.no_grad():
                clean = float(loss(model)(data[1]))
            model.train()
        for layer in (model[0], model[2]):
            assert layer.training and not layer.merged
        loss(model)(data[2]).backward()
        for layer in (model[0], model[2]):  # unmerged, the LoRA factors learn
            assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
        opt.step()
        runs.append(model)
    assert result.clean_loss == clean  # measured merged, as the evaluation
    assert_same_tensors(list(runs[0].state_dict().values()), list(runs[1].state_dict().values()))


def sft_config(tmp_path: Path, mode: str) -> trl.SFTConfig:
    # TRL's own defaults stay: gradient checkpointing on, bf16 autocast on.
    keep = {k: v for k, v in HF_ARGS.items() if k != "use_cpu"}
    return trl.SFTConfig(output_dir=str(tmp_path / mode), use_cpu=True, **keep)


def text_dataset(count: int, seed: int) -> Dataset:
    return Dataset.from_dict(
        {"text": [" ".join(str(t - 2) for t in s) for s in sequences(count, seed, 30)]}
    )


def run_sft(tmp_path: Path, mode: str, trainer_cls=trl.SFTTrainer):
    model, optimizer, _, observer, frozen = build(mode)
    config = sft_config(tmp_path, mode)
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=text_dataset(TRAIN, seed=1),
        eval_dataset=text_dataset(EVAL, seed=2),
        processing_class=tokenizer(),
        optimizers=(optimizer, None),
    )
    with recorded_warnings() as caught:
        trainer.train()
        trainer.evaluate()
    frozen.check()
    return trainer, model, observer, flatopt_warnings(caught)


def test_trl_sft_trainer_auto_is_the_explicit_loop_under_checkpointing_and_bf16(tmp_path):
    trainer, model, observer, warned = run_sft(tmp_path, "auto")
    assert trainer.args.gradient_checkpointing and trainer.args.bf16
    # Checkpointing re-runs each block's forward in the backward: it reads the same W + ε.
    counts = observer.check(train=2 * HF_TRAIN_READS, eval=HF_EVAL_READS, steps=STEPS)
    assert warned == []

    ref_trainer, ref_model, ref_observer, ref_warned = run_sft(
        tmp_path, "explicit", ExplicitSFTTrainer
    )
    assert ref_warned == []
    assert_same_reads(observer.reads, ref_observer.reads)
    assert history(trainer) == history(ref_trainer)
    assert_same_tensors(lora_factors(model), lora_factors(ref_model))
    report(f"trl {trl.__version__} SFTTrainer", counts)


def test_trl_sft_trainer_with_explicit_mode_warns_once(tmp_path):
    _, _, observer, warned = run_sft(tmp_path, "explicit")
    assert len(warned) == 1 and "auto=True" in warned[0], warned
    counts = observer.counts()
    assert counts["train_perturbed"] == 0 and counts["train"] == 2 * HF_TRAIN_READS
    report(f"trl {trl.__version__} SFTTrainer, explicit mode", counts)


# -- pytorch-lightning ---------------------------------------------------------------------------


def train_loader() -> DataLoader:
    return DataLoader(torch.tensor(sequences(TRAIN, seed=1)), batch_size=BATCH)


def eval_loader() -> DataLoader:
    return DataLoader(torch.tensor(sequences(EVAL, seed=2)), batch_size=BATCH)


class LitLM(pl.LightningModule):
    """The tiny GPT-2 as a LightningModule. ``perturb`` (manual optimization only) says how the
    training step perturbs: "none" (auto=True does it), "unwrap" (``flatopt.unwrap(opt)
    .perturbed()``) or "wrapper" (``perturbed()`` called on the LightningOptimizer itself)."""

    def __init__(self, model, optimizer, manual: bool = False, perturb: str = "none"):
        super().__init__()
        self.model = model
        self.flat_optimizer = optimizer
        self.automatic_optimization = not manual
        self.perturb = perturb
        self.losses: list[torch.Tensor] = []
        self.train_forwards = self.eval_forwards = 0

    def loss(self, batch):
        return self.model(input_ids=batch, labels=batch).loss

    def training_step(self, batch, batch_idx):
        self.train_forwards += 1
        if self.automatic_optimization:
            loss = self.loss(batch)
            self.losses.append(loss.detach())
            return loss
        opt = self.optimizers()
        context = {
            "none": nullcontext,
            "unwrap": lambda: flatopt.unwrap(opt).perturbed(),
            "wrapper": lambda: opt.perturbed(),
        }[self.perturb]
        with context():
            loss = self.loss(batch)
            self.manual_backward(loss / ACCUM)
        self.losses.append(loss.detach())
        if (batch_idx + 1) % ACCUM == 0:
            opt.step()
            opt.zero_grad()
        return None

    def validation_step(self, batch, batch_idx):
        self.eval_forwards += 1
        self.loss(batch)

    def configure_optimizers(self):
        return self.flat_optimizer


def run_lightning(
    mode: str, precision: str = "32", manual: bool = False, accumulate: int = ACCUM, **kwargs
):
    resample = kwargs.pop("resample", "step")
    model, optimizer, flat, observer, frozen = build(mode, resample=resample)
    lit = LitLM(model, optimizer, manual=manual, **kwargs)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        precision=precision,
        accumulate_grad_batches=1 if manual else accumulate,
        num_sanity_val_steps=1,  # one eval batch before training
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with recorded_warnings() as caught:
        trainer.fit(lit, train_loader(), eval_loader())
        trainer.validate(lit, eval_loader(), verbose=False)
    frozen.check()
    assert lit.train_forwards == STEPS * accumulate
    assert flat.num_steps == STEPS
    return lit, observer, flatopt_warnings(caught)


def reference_loop(precision: str = "32", resample: str = "step", accumulate: int = ACCUM):
    """The explicit loop Lightning's runs must equal: perturbed() around forward and backward,
    the loss divided by ``accumulate``, a step every ``accumulate`` micro-batches, over the
    same batches."""
    model, flat, _, observer, frozen = build("explicit", resample=resample)
    batches = itertools.islice(itertools.cycle(list(train_loader())), STEPS * accumulate)
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if precision == "bf16-mixed"
        else nullcontext
    )
    losses = []
    with recorded_warnings() as caught:
        for index, batch in enumerate(batches):
            with flat.perturbed():
                with autocast():
                    loss = model(input_ids=batch, labels=batch).loss
                (loss / accumulate).backward()
            losses.append(loss.detach())
            if (index + 1) % accumulate == 0:
                flat.step()
                flat.zero_grad()
    assert flatopt_warnings(caught) == []
    frozen.check()
    return model, observer, losses


def assert_lightning_matches(lit, observer, reference) -> None:
    ref_model, ref_observer, ref_losses = reference
    assert_same_reads(observer.train_reads, ref_observer.train_reads)
    assert_same_tensors(lit.losses, ref_losses)
    assert_same_tensors(lora_factors(lit.model), lora_factors(ref_model))


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_lightning_automatic_with_accumulation_perturbs_every_micro_batch(precision):
    lit, observer, warned = run_lightning("auto", precision)
    # Sanity check (1 batch), the validation after epoch 1, and trainer.validate (2 batches each).
    eval_reads = lit.eval_forwards * TARGETS
    assert lit.eval_forwards == 1 + 2 * (EVAL // BATCH)
    counts = observer.check(train=STEPS * ACCUM * TARGETS, eval=eval_reads, steps=STEPS)
    assert warned == []
    assert_lightning_matches(lit, observer, reference_loop(precision))
    report(f"pytorch-lightning {pl.__version__} automatic, precision {precision}", counts)


def test_lightning_automatic_in_explicit_mode_perturbs_the_closure_without_accumulation():
    """Without accumulation every training step runs inside ``step(closure)``, which explicit
    mode perturbs: the run is the explicit loop's, and nothing warns."""
    lit, observer, warned = run_lightning("explicit", accumulate=1)
    assert warned == []
    counts = observer.check(train=STEPS * TARGETS, eval=lit.eval_forwards * TARGETS, steps=STEPS)
    assert_lightning_matches(lit, observer, reference_loop(accumulate=1))
    report(f"pytorch-lightning {pl.__version__} automatic, explicit mode, no accumulation", counts)


def test_lightning_automatic_in_explicit_mode_with_accumulation_perturbs_only_the_closure():
    """Why the docs say auto=True: explicit mode perturbs what runs inside ``step(closure)``,
    and Lightning runs the other micro-batches of an accumulation window outside it."""
    _, observer, _ = run_lightning("explicit")
    counts = observer.counts()
    assert counts["train"] == STEPS * ACCUM * TARGETS
    assert counts["train_perturbed"] == STEPS * TARGETS
    perturbed = [
        not bits_equal(read.weight, observer.clean[read.name]) for read in observer.train_reads
    ]
    window = [False] * TARGETS + [True] * TARGETS  # the first micro-batch clean, the closure's not
    assert perturbed == window * STEPS
    report(f"pytorch-lightning {pl.__version__} automatic, explicit mode, accumulation", counts)


@pytest.mark.parametrize(
    ("mode", "perturb", "resample"),
    [
        ("auto", "none", "step"),
        ("auto", "none", "call"),
        ("explicit", "unwrap", "step"),
        ("explicit", "unwrap", "call"),
        ("explicit", "wrapper", "step"),
        ("explicit", "wrapper", "call"),
    ],
)
def test_lightning_manual_optimization_is_the_explicit_loop_without_false_warnings(
    mode, perturb, resample
):
    """LightningOptimizer.step passes a no-op closure: it must neither warn nor draw again.

    Under resample="call" every perturb() (explicit) or training forward of the model (auto)
    draws a fresh ε, so a second arming inside step() would shift every later draw.
    """
    lit, observer, warned = run_lightning(mode, manual=True, perturb=perturb, resample=resample)
    assert warned == []
    assert lit.eval_forwards == 1 + 2 * (EVAL // BATCH)
    if resample == "step":
        counts = observer.check(
            train=STEPS * ACCUM * TARGETS, eval=lit.eval_forwards * TARGETS, steps=STEPS
        )
    else:
        counts = observer.counts()
        assert counts["train_perturbed"] == counts["train"] == STEPS * ACCUM * TARGETS
        assert counts["eval_perturbed"] == 0
    assert_lightning_matches(lit, observer, reference_loop(resample=resample))
    report(f"pytorch-lightning {pl.__version__} manual, {mode}/{perturb}/{resample}", counts)


def test_lightning_manual_perturb_twice_on_the_wrapper_names_the_missing_restore():
    """perturb() and restore() called on the LightningOptimizer drive the FlatPerturb's state."""
    _, flat, _, _, _ = build("explicit")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    wrapped = pl.core.optimizer.LightningOptimizer._to_lightning_optimizer(flat, trainer.strategy)
    assert flatopt.unwrap(wrapped) is flat
    wrapped.perturb()
    assert flat.is_perturbed and wrapped.is_perturbed
    with pytest.raises(RuntimeError, match=r"restore\(\)") as error:
        wrapped.perturb()
    assert "another FlatPerturb" not in str(error.value)
    wrapped.restore()
    assert not flat.is_perturbed and not wrapped.is_perturbed


# -- Lightning Fabric (what litgpt's recipes run on) ------------------------------------------


def run_fabric(mode: str):
    model, optimizer, flat, observer, frozen = build(mode)
    fabric = lightning_fabric.Fabric(accelerator="cpu", devices=1)
    model, opt = fabric.setup(model, optimizer)
    assert flatopt.unwrap(opt) is flat
    losses = []
    with recorded_warnings() as caught:
        model.train()
        for index, batch in enumerate(itertools.islice(itertools.cycle(train_loader()), 8)):
            accumulating = (index + 1) % ACCUM != 0
            perturbed = flatopt.unwrap(opt).perturbed() if mode == "explicit" else nullcontext()
            with fabric.no_backward_sync(model, enabled=accumulating), perturbed:
                loss = model(input_ids=batch, labels=batch).loss
                fabric.backward(loss / ACCUM)
            losses.append(loss.detach())
            if not accumulating:
                opt.step()
                opt.zero_grad()
        model.eval()
        with torch.no_grad():
            losses += [model(input_ids=b, labels=b).loss for b in eval_loader()]
    frozen.check()
    assert flat.num_steps == 8 // ACCUM
    return model, observer, losses, flatopt_warnings(caught)


def test_lightning_fabric_auto_is_the_explicit_loop():
    model, observer, losses, warned = run_fabric("auto")
    counts = observer.check(train=8 * TARGETS, eval=(EVAL // BATCH) * TARGETS, steps=8 // ACCUM)
    assert warned == []
    ref_model, ref_observer, ref_losses, ref_warned = run_fabric("explicit")
    assert ref_warned == []
    assert_same_reads(observer.reads, ref_observer.reads)
    assert_same_tensors(losses, ref_losses)
    assert_same_tensors(lora_factors(model), lora_factors(ref_model))
    report(f"lightning-fabric {lightning_fabric.__version__}", counts)


# -- Accelerate ----------------------------------------------------------------------------------


def run_accelerate(mode: str, mixed_precision: str, epochs: int = 2):
    model, optimizer, flat, observer, frozen = build(mode)
    accelerator = accelerate.Accelerator(
        cpu=True, gradient_accumulation_steps=ACCUM, mixed_precision=mixed_precision
    )
    model, opt, loader, evals = accelerator.prepare(model, optimizer, train_loader(), eval_loader())
    assert isinstance(opt, accelerate.optimizer.AcceleratedOptimizer)
    assert flatopt.unwrap(opt) is flat
    losses, eval_losses = [], []
    with recorded_warnings() as caught:
        for _ in range(epochs):
            model.train()
            for batch in loader:
                with accelerator.accumulate(model):
                    perturbed = (
                        flatopt.unwrap(opt).perturbed() if mode == "explicit" else nullcontext()
                    )
                    with perturbed:
                        loss = model(input_ids=batch, labels=batch).loss
                        accelerator.backward(loss)
                    opt.step()
                    opt.zero_grad()
                losses.append(loss.detach())
            model.eval()
            with torch.no_grad():
                eval_losses += [model(input_ids=b, labels=b).loss for b in evals]
    frozen.check()
    assert flat.num_steps == epochs * TRAIN // BATCH // ACCUM
    return model, observer, losses + eval_losses, flatopt_warnings(caught)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerate_auto_is_the_explicit_loop(mixed_precision):
    model, observer, losses, warned = run_accelerate("auto", mixed_precision)
    steps = 2 * TRAIN // BATCH // ACCUM
    counts = observer.check(
        train=2 * TRAIN // BATCH * TARGETS, eval=2 * (EVAL // BATCH) * TARGETS, steps=steps
    )
    assert warned == []
    ref_model, ref_observer, ref_losses, ref_warned = run_accelerate("explicit", mixed_precision)
    assert ref_warned == []
    assert_same_reads(observer.reads, ref_observer.reads)
    assert_same_tensors(losses, ref_losses)
    assert_same_tensors(lora_factors(model), lora_factors(ref_model))
    report(f"accelerate {accelerate.__version__}, mixed_precision={mixed_precision}", counts)


def test_accelerate_with_explicit_mode_and_no_perturb_warns_once():
    model, flat, _, observer, _ = build("explicit")
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    model, opt, loader = accelerator.prepare(model, flat, train_loader())
    with recorded_warnings() as caught:
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(input_ids=batch, labels=batch).loss)
                opt.step()
                opt.zero_grad()
    warned = flatopt_warnings(caught)
    assert len(warned) == 1 and "auto=True" in warned[0], warned
    assert observer.counts()["train_perturbed"] == 0
    assert flat.num_steps == TRAIN // BATCH // ACCUM


def test_accelerate_auto_warns_once_when_the_loop_trains_in_eval_mode():
    """A loop that evaluated first and forgot model.train(): auto=True sees only eval-mode
    forwards, trains on the clean weights, and says so once."""
    model, flat, _, observer, frozen = build("auto")
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    model, opt, loader = accelerator.prepare(model, flat, train_loader())
    model.eval()
    with recorded_warnings() as caught:
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(input_ids=batch, labels=batch).loss)
                opt.step()
                opt.zero_grad()
    warned = flatopt_warnings(caught)
    assert len(warned) == 1 and "auto=True" in warned[0], warned
    assert observer.counts() == {
        "train": 0,
        "train_perturbed": 0,
        "eval": TRAIN // BATCH * TARGETS,
        "eval_perturbed": 0,
    }
    assert flat.num_steps == TRAIN // BATCH // ACCUM
    frozen.check()


def test_the_accelerated_optimizer_hides_the_flatperturb_and_unwrap_reaches_it():
    model, flat, _, _, _ = build("auto")
    accelerator = accelerate.Accelerator(cpu=True)
    _, opt = accelerator.prepare(model, flat)
    for name in ("perturbed", "sigma", "num_steps"):  # AcceleratedOptimizer does not forward them
        with pytest.raises(AttributeError):
            getattr(opt, name)
    assert flatopt.unwrap(opt) is flat
    assert flatopt.unwrap(flat) is flat
    assert opt.state_dict()["flatopt"] == flat.state_dict()["flatopt"]


# -- the versions the pins promise -------------------------------------------------------------


def test_the_installed_frameworks_are_the_pinned_ones():
    pins = {}
    path = Path(__file__).parents[2] / "constraints" / "integrations.txt"
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, pinned = line.split("==")
            pins[name.lower()] = pinned
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "pytorch-lightning"):
        installed = version(name).split("+")[0]
        assert installed == pins[name], (name, installed, pins[name])
        print(f"version {name} {installed}")
