"""Quality: plain LoRA against Flat-LoRA (``flatopt.FlatPerturb``) on real few-shot tasks.

For a given seed every arm gets the same training examples, LoRA and head initialisation,
batch order, learning rate, epochs and rank: the pairs differ only in the regulariser. Four
presets (``--preset``):

- ``sigma`` (the default), the σ sweep, written to ``sigma.json``: ``LoRA``; ``LoRA+dropout``
  (dropout 0.2 on the LoRA path); ``Flat σ`` for σ in {0.05, 0.1, 0.2, 0.3, 0.5}, cosine
  schedule, with every trained layer perturbed (the LoRA layers, and a new head as a dense
  target). On the tasks ``rotated`` and ``digits`` (40 seeds each) and ``vader`` (10).
- ``steps``, written to ``sigma_steps.json``: how σ interacts with the length of training and
  with dropout, on ``rotated``: plain LoRA, Flat σ ∈ {0.1, 0.3, 0.5}, dropout 0.2 and dropout
  0.2 with Flat 0.3, each at 15, 30, 60 and 120 epochs; every arm is compared with plain LoRA
  trained for as many epochs.
- ``pretrain``, written to ``sigma_pretrain.json``: does the result on ``rotated`` depend on
  the pretrained model? Eight more pretraining runs of its MLP (pretraining seeds 1-8), each
  adapted with 10 seeds: plain LoRA and the Flat σ of the sweep.
- ``paper``, written to ``quality.json``: the earlier comparison in the paper's σ range:
  ``LoRA``, ``LoRA+dropout``, ``Flat σ`` (the LoRA layers only, the paper's default) and
  ``Flat+head σ`` for σ in {0.05, 0.10, 0.15}, on ``vader`` and ``digits``.

Tasks (``benchmarks/_quality_tasks.py``): ``vader``, 5-class valence of single words from the
VADER lexicon with a pretrained MiniLM-L6 encoder (LoRA on its last two layers, a new head);
``digits``, scikit-learn's 8×8 digits, a CNN pretrained on 0-4 and adapted to 5-9 few-shot (LoRA
on its two linears, a new head); ``rotated``, an MLP pretrained on upright digits and adapted
few-shot to digits rotated by 45° (LoRA on every layer, the pretrained head included).

Metrics per run: clean test accuracy; accuracy on a shifted test set (vader: words with high
rater disagreement) and under each corruption at each severity; the accuracy drop after
symmetric per-row int4 (and, in ``paper``, int8) rounding of every merged trained weight; and
``flatopt.sharpness`` on held-out data at fixed probe σ (``sigma``, ``steps``: 0.1 and 0.3 over
every trained layer; ``paper``: 0.1 over the LoRA layers, and over the LoRA layers plus the
head). The time of each run (training, and evaluation) is recorded.

Statistics: each arm is compared with its baseline through the per-seed differences: their
mean with a t-based 95% confidence interval, a paired t-test p-value, and the number of seeds
on which the arm did better. The Holm correction runs over the family of every Flat arm's
comparison on every metric of every task in the run (a test set that only repeats another is
counted once); its size is reported.

Run (on one idle core, ``rotated`` and ``digits`` take about 5 minutes each, ``vader`` about
20 s a run; a busy machine multiplies that, and the JSON records the time of every run).
``--smoke`` takes seconds and never writes to ``benchmarks/results/``::

    pip install -e ".[evidence]"
    nice -n 10 python benchmarks/quality.py --jobs 1 --plots docs/img
    nice -n 10 python benchmarks/quality.py --preset steps --jobs 1 --plots docs/img
    python benchmarks/quality.py --smoke --out /tmp/quality_smoke.json
    python benchmarks/quality.py --replot benchmarks/results/sigma.json --plots docs/img

The tasks run one after the other and the report is saved after each, so a long run that is
stopped keeps what it finished; ``--tasks vader --add-to`` then adds a task to that report.
Outputs ``benchmarks/results/<preset file>.json`` and, next to it, the ``.md`` tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quality_tasks import (
    Task,
    Training,
    digits_task,
    mean_ci,
    quantize_rows,
    rotated_task,
    vader_task,
)

import flatopt
from flatopt.lora import LoRALinear, add_lora

RESULTS = Path(__file__).resolve().parent / "results"
OUTPUTS = {
    "sigma": "sigma.json",
    "steps": "sigma_steps.json",
    "pretrain": "sigma_pretrain.json",
    "paper": "quality.json",
}
TASKS = ("rotated", "digits", "vader")
SIGNIFICANT = 0.05


@dataclass(frozen=True)
class Arm:
    name: str
    sigma: float = 0.0
    head: bool = False  # perturb a new, dense head too
    dropout: float = 0.0
    epochs: Optional[int] = None  # None: the task's own
    baseline: str = "LoRA"  # the arm this one is compared with


@dataclass(frozen=True)
class Config:
    preset: str = "sigma"
    tasks: tuple[str, ...] = ("rotated", "digits", "vader")  # cheapest first
    first_seed: int = 100  # the pilot that chose the rotated task used seeds 0-19
    vader_seeds: int = 10  # a vader run takes 10-20 s on an idle core, 10x more on a busy one
    digits_seeds: int = 40
    rotated_seeds: int = 40
    sigmas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    epochs_grid: tuple[int, ...] = ()  # ``steps``: the epochs every arm is run at
    pretrain_seeds: tuple[int, ...] = (0,)  # ``rotated``: one pretrained MLP per seed here
    dropout: float = 0.2
    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-3
    vader_shots: int = 16
    vader_epochs: int = 30
    vader_test_per_class: int = 100
    vader_pool_per_class: Optional[int] = None  # None: every agreed-on word outside the test
    digits_shots: int = 5
    digits_epochs: int = 60
    digits_pretrain_epochs: int = 30
    rotated_shots: int = 5
    rotated_degrees: float = 45.0
    rotated_epochs: int = 60
    rotated_pretrain_epochs: int = 40
    rotated_rank: int = 4
    rotated_alpha: float = 8.0
    rotated_lr: float = 3e-3
    sharpness_size: int = 200
    sharpness_samples: int = 8
    probes: tuple[float, ...] = (0.1, 0.3)
    bits: tuple[int, ...] = (4,)


PRESETS = {
    "sigma": Config(),
    "steps": Config(
        preset="steps",
        tasks=("rotated",),
        first_seed=200,
        rotated_seeds=30,
        sigmas=(0.1, 0.3, 0.5),
        epochs_grid=(15, 30, 60, 120),
    ),
    "pretrain": Config(
        preset="pretrain",
        tasks=("rotated",),
        first_seed=300,
        rotated_seeds=10,
        pretrain_seeds=(1, 2, 3, 4, 5, 6, 7, 8),
    ),
    "paper": Config(
        preset="paper",
        tasks=("vader", "digits"),
        first_seed=0,
        vader_seeds=5,
        digits_seeds=30,
        sigmas=(0.05, 0.10, 0.15),
        probes=(0.1,),
        bits=(8, 4),
    ),
}
SMOKE = dict(
    vader_seeds=2,
    digits_seeds=2,
    rotated_seeds=2,
    vader_shots=2,
    vader_epochs=1,
    vader_test_per_class=8,
    vader_pool_per_class=8,
    digits_shots=2,
    digits_epochs=2,
    digits_pretrain_epochs=1,
    rotated_shots=2,
    rotated_epochs=2,
    rotated_pretrain_epochs=1,
    sharpness_size=20,
    sharpness_samples=2,
)


def smoke(cfg: Config) -> Config:
    """The preset at tiny sizes, with one Flat σ: it checks the code, not the figures."""
    grid = (2,) if cfg.epochs_grid else ()
    return replace(cfg, **SMOKE, sigmas=cfg.sigmas[-1:], epochs_grid=grid)


def arms(cfg: Config) -> list[Arm]:
    if cfg.preset == "paper":
        return [
            Arm("LoRA"),
            Arm("LoRA+dropout", dropout=cfg.dropout),
            *[Arm(f"Flat {s:.2f}", sigma=s) for s in cfg.sigmas],
            *[Arm(f"Flat+head {s:.2f}", sigma=s, head=True) for s in cfg.sigmas],
        ]
    if cfg.preset == "steps":
        found = []
        for epochs in cfg.epochs_grid:
            base, mid = f"LoRA, {epochs} ep", cfg.sigmas[len(cfg.sigmas) // 2]
            found += [
                Arm(base, epochs=epochs, baseline=base),
                *[
                    Arm(
                        f"Flat {s:.2f}, {epochs} ep",
                        sigma=s,
                        head=True,
                        epochs=epochs,
                        baseline=base,
                    )
                    for s in cfg.sigmas
                ],
                Arm(f"dropout, {epochs} ep", dropout=cfg.dropout, epochs=epochs, baseline=base),
                Arm(
                    f"dropout+Flat {mid:.2f}, {epochs} ep",
                    sigma=mid,
                    head=True,
                    dropout=cfg.dropout,
                    epochs=epochs,
                    baseline=base,
                ),
            ]
        return found
    dropout = [Arm("LoRA+dropout", dropout=cfg.dropout)] if cfg.preset == "sigma" else []
    return [
        Arm("LoRA"),
        *dropout,
        *[Arm(f"Flat {s:.2f}", sigma=s, head=True) for s in cfg.sigmas],
    ]


def higher_is_better(metric: str) -> bool:
    return metric.startswith(("acc", "f1"))


# -- one run ------------------------------------------------------------------------------------


def build(task: Task, arm: Arm, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the head and the LoRA factors: the same init for every arm
    model = task.make_model()
    training = task.training
    add_lora(model, task.lora_names, rank=training.rank, alpha=training.alpha, dropout=arm.dropout)
    if task.new_head:
        model.head.requires_grad_(True)  # a new head is always trained
    return model


def head_adapters(model: nn.Module, task: Task, with_head: bool) -> list:
    """A new head as a dense target, when asked (a LoRA head is a target anyway)."""
    return [flatopt.dense(model.head)] if with_head and task.new_head else []


def train(task: Task, arm: Arm, seed: int) -> nn.Module:
    inputs, labels = task.split(seed)
    epochs = arm.epochs or task.training.epochs
    model = build(task, arm, seed).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(trainable, lr=task.training.lr)
    batches = math.ceil(len(labels) / task.batch_size)
    flat: Optional[flatopt.FlatPerturb] = None
    if arm.sigma > 0:
        flat = flatopt.FlatPerturb(
            optimizer,
            model,
            sigma=arm.sigma,
            total_steps=epochs * batches,
            seed=seed,
            adapters=head_adapters(model, task, arm.head),
        )
        optimizer = flat
    order = torch.Generator().manual_seed(seed)  # the batch order, shared by every arm
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=order).split(task.batch_size):
            if flat is not None:
                flat.perturb()
            F.cross_entropy(model(*(t[idx] for t in inputs)), labels[idx]).backward()
            if flat is not None:
                flat.restore()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    inputs, labels = data
    correct = 0
    for idx in torch.arange(len(labels)).split(512):
        correct += int((model(*(t[idx] for t in inputs)).argmax(1) == labels[idx]).sum())
    return 100.0 * correct / len(labels)


@torch.no_grad()
def quantized(model: nn.Module, task: Task, bits: int) -> nn.Module:
    """A copy whose LoRA layers hold round(W + s·B·A) and whose new head holds round(W)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.base.weight.copy_(quantize_rows(module.merged_weight(), bits))
            module.lora_B.zero_()
    if task.new_head:
        model.head.weight.copy_(quantize_rows(model.head.weight, bits))
    return model


def sharpness(
    model: nn.Module, task: Task, cfg: Config, with_head: bool
) -> list[flatopt.Sharpness]:
    inputs, labels = task.sharpness_set
    batches = [
        (tuple(t[idx] for t in inputs), labels[idx]) for idx in torch.arange(len(labels)).split(512)
    ]
    return flatopt.sharpness(
        model,
        lambda batch: F.cross_entropy(model(*batch[0]), batch[1]),
        batches,
        sigma=cfg.probes,
        samples=cfg.sharpness_samples,
        seed=777,  # the same draws of z for every arm
        adapters=head_adapters(model, task, with_head),
    )


def evaluate(model: nn.Module, task: Task, cfg: Config) -> dict[str, float]:
    metrics = {f"acc {name}": accuracy(model, data) for name, data in task.eval_sets.items()}
    for k in range(len(next(iter(task.severities.values())))):
        names = [levels[k] for levels in task.severities.values()]
        metrics[f"acc corrupted-{k + 1}"] = sum(metrics[f"acc {n}"] for n in names) / len(names)
    for bits in cfg.bits:
        clean = accuracy(quantized(model, task, bits), task.eval_sets["clean"])
        metrics[f"drop int{bits}"] = metrics["acc clean"] - clean
    if cfg.preset == "paper":  # its two views of the same probe σ
        metrics["sharpness lora"] = sharpness(model, task, cfg, with_head=False)[0].mean
        metrics["sharpness lora+head"] = sharpness(model, task, cfg, with_head=True)[0].mean
    else:  # every trained layer, at each probe σ
        for result in sharpness(model, task, cfg, with_head=True):
            metrics[f"sharpness {result.sigma:.2f}"] = result.mean
    return metrics


# -- statistics ---------------------------------------------------------------------------------


def paired_p(diffs: list[float]) -> float:
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    if n < 2 or var == 0:
        return math.nan
    tstat = mean / math.sqrt(var / n)
    try:
        from scipy.stats import t

        return float(2 * t.sf(abs(tstat), n - 1))
    except ImportError:  # pragma: no cover
        return math.nan


def summarise(
    runs: dict[str, list[dict[str, float]]], baselines: dict[str, str]
) -> dict[str, dict[str, dict]]:
    """Per arm and metric: mean ± CI, and against its baseline the paired difference and wins."""
    summary: dict[str, dict[str, dict]] = {}
    for arm, per_seed in runs.items():
        base = runs[baselines[arm]]
        summary[arm] = {}
        for metric in per_seed[0]:
            values = [r[metric] for r in per_seed]
            mean, ci = mean_ci(values)
            entry = {"mean": mean, "ci95": ci, "n": len(values)}
            if baselines[arm] != arm:
                diffs = [r[metric] - b[metric] for r, b in zip(per_seed, base)]
                dmean, dci = mean_ci(diffs)
                better = (lambda d: d > 0) if higher_is_better(metric) else (lambda d: d < 0)
                entry["diff"] = {
                    "mean": dmean,
                    "ci95": dci,
                    "p": paired_p(diffs),
                    "wins": sum(better(d) for d in diffs),
                    "ties": sum(d == 0 for d in diffs),
                }
            summary[arm][metric] = entry
    return summary


def is_flat(report: dict, arm: str) -> bool:
    found = [a for a in report["arms"] if a["name"] == arm]
    return bool(found) and found[0]["sigma"] > 0


def in_family(report: dict, arm: str) -> bool:
    """The arms the Holm family covers: ``holm_arms`` where the report names them (every
    method compared), else every Flat arm."""
    return arm in report["holm_arms"] if "holm_arms" in report else is_flat(report, arm)


def family(report: dict) -> list[tuple[str, str, str]]:
    """(task, arm, metric) of every compared arm's comparison: the Holm family of the run.

    A task with one corruption type has ``acc corrupted-k`` equal to that type's set k, so
    those averages are counted once, as the set itself.
    """
    members = []
    for task, result in report["tasks"].items():
        repeats = len(result["corruptions"]) == 1
        for arm, metrics in result["summary"].items():
            if not in_family(report, arm):
                continue
            for metric, entry in metrics.items():
                if "diff" in entry and not (repeats and metric.startswith("acc corrupted-")):
                    members.append((task, arm, metric))
    return members


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values (a NaN p, from differences that never vary, counts as 1)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: 1.0 if math.isnan(pvalues[i]) else pvalues[i])
    adjusted, running = [1.0] * m, 0.0
    for rank, i in enumerate(order):
        p = 1.0 if math.isnan(pvalues[i]) else pvalues[i]
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def add_holm(report: dict) -> int:
    """Write ``p_holm`` into every diff of the family; return the family's size."""
    members = family(report)
    tasks = report["tasks"]
    pvalues = [tasks[t]["summary"][a][m]["diff"]["p"] for t, a, m in members]
    for (t, a, m), p in zip(members, holm(pvalues)):
        tasks[t]["summary"][a][m]["diff"]["p_holm"] = p
    report["holm_family"] = len(members)
    return len(members)


# -- reports ------------------------------------------------------------------------------------

LABELS = {
    "acc clean": "clean acc %",
    "f1 clean": "macro-F1 %",
    "nll clean": "NLL",
    "acc shifted": "shifted acc %",
    "acc corrupted-1": "corr. 1 %",
    "acc corrupted-2": "corr. 2 %",
    "acc corrupted-3": "corr. 3 %",
    "drop int8": "int8 drop",
    "drop int4": "int4 drop",
    "sharpness lora": "sharp. LoRA",
    "sharpness lora+head": "sharp. +head",
}


def label(metric: str) -> str:
    if metric.startswith("sharpness ") and metric not in LABELS:
        return f"sharp. @{metric.split()[1]}"
    return LABELS.get(metric, metric)


def table_metrics(summary: dict) -> list[str]:
    metrics = list(summary[next(iter(summary))])
    order = [m for m in LABELS if m in metrics]
    return order + [m for m in metrics if m.startswith("sharpness ") and m not in order]


def _fmt(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def diff_cell(d: dict, digits: int, n: int) -> str:
    """Mean [95% CI] wins/n; bold if the CI excludes 0, † if it survives Holm."""
    lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
    text = f"{d['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
    if d["ci95"] > 0 and (lo > 0 or hi < 0):
        text = f"**{text}**"
    mark = "†" if d.get("p_holm", 1.0) < SIGNIFICANT else ""
    return f"{text}{mark} {d['wins']}/{n}"


def run_seconds(result: dict, arm: str) -> tuple[float, float]:
    """The mean training and evaluation seconds of one arm's runs."""
    times = result.get("seconds", {}).get(arm)
    if not times:
        return math.nan, math.nan
    return statistics.fmean(t[0] for t in times), statistics.fmean(t[1] for t in times)


def headline(report: dict) -> list[str]:
    """The σ table: clean accuracy against the baseline, one column per task."""
    tasks = report["tasks"]
    unit = "paired runs" if report["config"]["preset"] == "pretrain" else "seeds"
    names = [a["name"] for a in report["arms"] if a["name"] != a.get("baseline", "LoRA")]
    lines = [
        "Clean test accuracy, paired difference against plain LoRA in points: mean [95% CI] "
        "wins/seeds. **Bold**: the CI excludes 0; †: significant after the Holm correction "
        f"over all {report['holm_family']} comparisons of the run.",
        "",
        "| arm | "
        + " | ".join(f"{t} ({tasks[t]['summary']['LoRA']['acc clean']['n']} {unit})" for t in tasks)
        + " |",
        "|---|" + "---|" * len(tasks),
        "| LoRA (accuracy %) | "
        + " | ".join(
            f"{tasks[t]['summary']['LoRA']['acc clean']['mean']:.2f} ± "
            f"{tasks[t]['summary']['LoRA']['acc clean']['ci95']:.2f}"
            for t in tasks
        )
        + " |",
    ]
    for arm in names:
        cells = []
        for t in tasks:
            entry = tasks[t]["summary"][arm]["acc clean"]
            cells.append(diff_cell(entry["diff"], 2, entry["n"]))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(report: dict) -> str:
    add_holm(report)
    preset = report.get("config", {}).get("preset", "paper")
    probes = report.get("config", {}).get("probes", [report.get("sharpness_sigma")])
    lines = [
        f"# Quality: plain LoRA vs Flat-LoRA ({preset})",
        "",
        f"Generated by `{report['command']}` in {report['seconds'] / 60:.1f} min "
        f"({report['machine']})."
        + ("" if report.get("complete", True) else " **Incomplete: the run was stopped.**"),
        "",
    ]
    if preset in ("sigma", "pretrain"):
        lines += ["## σ sweep, clean accuracy", "", *headline(report)]
    for task, result in report["tasks"].items():
        summary = result["summary"]
        metrics = table_metrics(summary)
        digits = {m: 4 if m.startswith("sharp") else 2 for m in metrics}
        timed = "seconds" in result
        seeds = next(iter(summary.values()))["acc clean"]["n"]
        lines += [f"## {task}", ""]
        lines += [f"- {note}" for note in result["notes"]]
        lines += [
            "",
            f"Mean ± 95% CI over {seeds} seeds. Accuracies in %, drops in points (clean minus "
            "quantized), sharpness = E[L(W'+ε)] − L(W') at σ = "
            + ", ".join(f"{p:g}" for p in probes)
            + "."
            + (" Time: mean seconds per run, training + evaluation." if timed else ""),
            "",
            "| arm | " + " | ".join(label(m) for m in metrics) + (" | time s |" if timed else " |"),
            "|---|" + "---|" * (len(metrics) + timed),
        ]
        for arm, entry in summary.items():
            cells = [
                f"{_fmt(entry[m]['mean'], digits[m])} ± {_fmt(entry[m]['ci95'], digits[m])}"
                for m in metrics
            ]
            if timed:
                train_s, eval_s = run_seconds(result, arm)
                cells.append(f"{train_s:.1f} + {eval_s:.1f}")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Paired difference arm − baseline (mean [95% CI]; wins/{seeds} = seeds where the "
            "arm did better: higher accuracy, smaller drop, lower sharpness). **Bold**: the CI "
            "excludes 0. †: significant after the Holm correction over all "
            f"{report['holm_family']} Flat-arm comparisons of the run.",
            "",
            "| arm | " + " | ".join(label(m) for m in metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        compared = [arm for arm, entry in summary.items() if "diff" in entry["acc clean"]]
        for arm in compared:
            cells = [diff_cell(summary[arm][m]["diff"], digits[m], seeds) for m in metrics]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        details = [m for m in metrics if m.startswith("acc ") and "corrupted" not in m]
        details += [m for m in summary[compared[0]] if m.startswith("acc ") and m not in metrics]
        baseline = ["LoRA"] if "LoRA" in summary else []
        lines += [
            "",
            "Every test set, Δ vs the baseline in points (mean ±CI half-width, wins; "
            "†: significant after the Holm correction, as above):",
            "",
            "| test set | " + " | ".join(baseline + compared) + " |",
            "|---|" + "---|" * len(baseline + compared),
        ]
        for m in details:
            row = [f"{summary['LoRA'][m]['mean']:.2f}"] if baseline else []
            for arm in compared:
                d = summary[arm][m]["diff"]
                mark = "†" if d.get("p_holm", 1.0) < SIGNIFICANT else ""
                row.append(f"{d['mean']:+.2f} ±{d['ci95']:.2f} ({d['wins']}){mark}")
            lines.append(f"| {m[4:]} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


# -- figures ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(report: dict, folder: Path) -> list[Path]:
    """The figures of the report's preset, written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    preset = report.get("config", {}).get("preset", "paper")
    draw = {
        "paper": paper_plots,
        "sigma": sigma_plots,
        "pretrain": sigma_plots,
        "steps": steps_plots,
    }[preset]
    return draw(report, folder)


def _errorbars(ax, xs, entries, **style) -> None:
    ax.errorbar(
        xs,
        [e["mean"] for e in entries],
        yerr=[e["ci95"] for e in entries],
        marker="o",
        capsize=3,
        **style,
    )


SWEEP_ROWS = (
    ("acc clean", "Δ clean accuracy (points)"),
    ("acc corrupted-1", "Δ accuracy, corruption severity 1"),
    ("acc corrupted-3", "Δ accuracy, corruption severity 3"),
    ("drop int4", "Δ int4 drop (points)"),
    ("sharpness 0.30", "Δ sharpness at probe σ = 0.3"),
)


def sigma_plots(report: dict, folder: Path) -> list[Path]:
    """Paired Δ against plain LoRA as a function of the training σ, one column per task."""
    plt = _pyplot()
    tasks = report["tasks"]
    sigmas = [0.0] + [a["sigma"] for a in report["arms"] if a["sigma"] > 0]
    flat = [a["name"] for a in report["arms"] if a["sigma"] > 0]
    zero = {"mean": 0.0, "ci95": 0.0}
    fig, axes = plt.subplots(
        len(SWEEP_ROWS),
        len(tasks),
        figsize=(4.6 * len(tasks), 2.6 * len(SWEEP_ROWS)),
        squeeze=False,
    )
    for col, (task, result) in enumerate(tasks.items()):
        summary = result["summary"]
        for row, (metric, ylabel) in enumerate(SWEEP_ROWS):
            ax = axes[row, col]
            if metric not in summary["LoRA"]:
                ax.set_visible(False)
                continue
            entries = [zero] + [summary[arm][metric]["diff"] for arm in flat]
            _errorbars(ax, sigmas, entries, color="tab:blue", label="Flat-LoRA")
            dropout = summary.get("LoRA+dropout", {}).get(metric)
            if dropout is not None:
                d = dropout["diff"]
                ax.axhspan(
                    d["mean"] - d["ci95"],
                    d["mean"] + d["ci95"],
                    color="tab:green",
                    alpha=0.15,
                    label="LoRA+dropout, 95% CI",
                )
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xticks(sigmas, [f"{s:g}" for s in sigmas], fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            if row == 0:
                seeds = summary["LoRA"]["acc clean"]["n"]
                ax.set_title(f"{task} ({seeds} paired seeds)")
            if row == len(SWEEP_ROWS) - 1:
                ax.set_xlabel("training σ (cosine schedule)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Flat-LoRA − plain LoRA, mean and 95% CI of the paired difference", fontsize=10)
    fig.tight_layout()
    preset = report["config"]["preset"]
    path = folder / ("sigma_sweep.png" if preset == "sigma" else f"sigma_{preset}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def steps_plots(report: dict, folder: Path) -> list[Path]:
    """Paired Δ clean accuracy against σ, one line per training length."""
    plt = _pyplot()
    grid = report["config"]["epochs_grid"]
    sigmas = report["config"]["sigmas"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    colours = plt.get_cmap("viridis")
    for task, result in report["tasks"].items():
        summary = result["summary"]
        for i, epochs in enumerate(grid):
            colour = colours(i / max(len(grid) - 1, 1))
            entries = [{"mean": 0.0, "ci95": 0.0}] + [
                summary[f"Flat {s:.2f}, {epochs} ep"]["acc clean"]["diff"] for s in sigmas
            ]
            offset = (i - len(grid) / 2) * 0.006
            _errorbars(
                axes[0, 0],
                [offset + s for s in [0.0, *sigmas]],
                entries,
                color=colour,
                label=f"{epochs} epochs",
            )
            base = summary[f"LoRA, {epochs} ep"]["acc clean"]
            arms_here = [
                f"dropout, {epochs} ep",
                f"dropout+Flat {sigmas[len(sigmas) // 2]:.2f}, {epochs} ep",
            ]
            marks = ["s", "D"]
            for arm, marker in zip(arms_here, marks):
                d = summary[arm]["acc clean"]["diff"]
                axes[0, 1].errorbar(
                    i + (0.15 if marker == "D" else -0.15),
                    d["mean"],
                    yerr=d["ci95"],
                    marker=marker,
                    capsize=3,
                    color=colour,
                )
            axes[0, 1].annotate(f"LoRA: {base['mean']:.1f}%", (i, 0.05), fontsize=7, ha="center")
        axes[0, 0].set_title(f"{task}: Flat-LoRA − LoRA at the same epochs")
        axes[0, 1].set_title(
            f"dropout (squares), dropout + Flat {sigmas[len(sigmas) // 2]:.2f} (diamonds)"
        )
        axes[0, 1].set_ylabel("Δ clean accuracy vs LoRA (points)")
    axes[0, 0].axhline(0, color="black", linewidth=0.8)
    axes[0, 1].axhline(0, color="black", linewidth=0.8)
    axes[0, 0].set_xlabel("training σ (cosine schedule)")
    axes[0, 0].set_ylabel("Δ clean accuracy (points)")
    axes[0, 1].set_xticks(range(len(grid)), [f"{e} ep" for e in grid])
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    path = folder / "sigma_steps.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def paper_plots(report: dict, folder: Path) -> list[Path]:
    """Accuracy vs corruption severity, sharpness and quantization drop, per task."""
    plt = _pyplot()
    tasks = report["tasks"]
    names = list(next(iter(tasks.values()))["summary"])
    colours = {"LoRA": "black", "LoRA+dropout": "tab:green"}
    blues = iter(["#9ecae1", "#4292c6", "#08519c"])
    reds = iter(["#fc9272", "#ef3b2c", "#a50f15"])
    for name in names:
        if name.startswith("Flat+head"):
            colours[name] = next(reds)
        elif name.startswith("Flat"):
            colours[name] = next(blues)
    written = []

    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 8), squeeze=False)
    for col, (task, result) in enumerate(tasks.items()):
        summary = result["summary"]
        levels = ["acc clean", "acc corrupted-1", "acc corrupted-2", "acc corrupted-3"]
        xs = list(range(len(levels)))
        for i, arm in enumerate(names):
            means = [summary[arm][m]["mean"] for m in levels]
            axes[0, col].plot(xs, means, marker="o", color=colours[arm], label=arm)
            if arm != "LoRA":
                offset = (i - len(names) / 2) * 0.03
                _errorbars(
                    axes[1, col],
                    [x + offset for x in xs],
                    [summary[arm][m]["diff"] for m in levels],
                    color=colours[arm],
                    label=arm,
                )
        axes[1, col].axhline(0, color="black", linewidth=0.8)
        kinds = ", ".join(result["corruptions"])
        axes[0, col].set_title(f"{task}: accuracy vs corruption severity ({kinds})")
        axes[1, col].set_title(f"{task}: paired Δ vs plain LoRA, 95% CI")
        for row in range(2):
            axes[row, col].set_xticks(xs, ["clean", "1", "2", "3"])
            axes[row, col].set_xlabel("severity")
        axes[0, col].set_ylabel("test accuracy (%)")
        axes[1, col].set_ylabel("Δ accuracy (points)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    written.append(folder / "quality_corruption.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    for stem, pair, ylabel in (
        ("quality_sharpness", ("sharpness lora", "sharpness lora+head"), "E[L(W'+ε)] − L(W')"),
        ("quality_quantization", ("drop int8", "drop int4"), "accuracy drop (points)"),
    ):
        fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
        for col, (task, result) in enumerate(tasks.items()):
            summary = result["summary"]
            width = 0.4
            for j, metric in enumerate(pair):
                xs = [i + (j - 0.5) * width for i in range(len(names))]
                axes[0, col].bar(
                    xs,
                    [summary[a][metric]["mean"] for a in names],
                    width,
                    yerr=[summary[a][metric]["ci95"] for a in names],
                    capsize=2,
                    color=[colours[a] for a in names],
                    alpha=1.0 if j == 0 else 0.5,
                    hatch=None if j == 0 else "//",
                    label=metric,
                )
            axes[0, col].set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
            axes[0, col].set_ylabel(ylabel)
            axes[0, col].set_title(f"{task}: {' (solid) / '.join(pair)} (hatched), 95% CI")
            axes[0, col].axhline(0, color="black", linewidth=0.8)
        fig.tight_layout()
        written.append(folder / f"{stem}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


# -- main ---------------------------------------------------------------------------------------


def make_task(name: str, cfg: Config, pretrain_seed: int = 0) -> Task:
    if name == "vader":
        return vader_task(
            cfg.vader_shots,
            cfg.vader_test_per_class,
            cfg.sharpness_size,
            Training(cfg.rank, cfg.alpha, cfg.lr, cfg.vader_epochs),
            pool_per_class=cfg.vader_pool_per_class,
        )
    if name == "digits":
        return digits_task(
            cfg.digits_shots,
            cfg.digits_pretrain_epochs,
            cfg.sharpness_size,
            Training(cfg.rank, cfg.alpha, cfg.lr, cfg.digits_epochs),
        )
    return rotated_task(
        cfg.rotated_shots,
        cfg.rotated_degrees,
        cfg.rotated_pretrain_epochs,
        cfg.sharpness_size,
        Training(cfg.rotated_rank, cfg.rotated_alpha, cfg.rotated_lr, cfg.rotated_epochs),
        pretrain_seed=pretrain_seed,
    )


def run_task(name: str, cfg: Config, start: float) -> dict:
    torch.set_num_threads(1)  # tiny matrices: more threads only add overhead
    log = lambda text: print(f"[{time.time() - start:7.1f}s] {text}", flush=True)  # noqa: E731
    pretrain_seeds = cfg.pretrain_seeds if name == "rotated" else (0,)
    seeds = range(cfg.first_seed, cfg.first_seed + getattr(cfg, f"{name}_seeds"))
    chosen = arms(cfg)
    runs: dict[str, list[dict[str, float]]] = {arm.name: [] for arm in chosen}
    seconds: dict[str, list[tuple[float, float]]] = {arm.name: [] for arm in chosen}
    notes: list[str] = []
    for pretrain_seed in pretrain_seeds:
        task = make_task(name, cfg, pretrain_seed)
        notes = notes or task.notes
        log(f"{name}: data and pretrained model ready; seeds {seeds.start}-{seeds.stop - 1}")
        for seed in seeds:
            for arm in chosen:
                t0 = time.perf_counter()
                model = train(task, arm, seed)
                train_s = time.perf_counter() - t0
                metrics = evaluate(model, task, cfg)
                eval_s = time.perf_counter() - t0 - train_s
                runs[arm.name].append(metrics)
                seconds[arm.name].append((train_s, eval_s))
                sharp = next(v for k, v in metrics.items() if k.startswith("sharpness"))
                log(
                    f"{task.name} seed {seed} {arm.name:22} clean {metrics['acc clean']:6.2f} "
                    f"corr-3 {metrics['acc corrupted-3']:6.2f} int4 drop "
                    f"{metrics['drop int4']:6.2f} sharp {sharp:.4f}  ({train_s:.1f}+{eval_s:.1f} s)"
                )
    if len(pretrain_seeds) > 1:
        notes = [
            f"{len(pretrain_seeds)} pretrained MLPs (pretraining seeds {pretrain_seeds[0]}-"
            f"{pretrain_seeds[-1]}), each adapted with seeds {seeds.start}-{seeds.stop - 1}: "
            f"{len(pretrain_seeds) * len(seeds)} paired runs per arm",
            *notes[1:],
        ]
    return {
        "notes": notes,
        "corruptions": list(task.severities),
        "epochs": task.training.epochs,
        "training": asdict(task.training),
        "seeds": list(seeds),
        "pretrain_seeds": list(pretrain_seeds),
        "summary": summarise(runs, {arm.name: arm.baseline for arm in chosen}),
        "per_seed": runs,
        "seconds": seconds,
    }


def output_path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """Where the JSON goes. A smoke run never writes into ``benchmarks/results``."""
    if args.out is None:
        if args.smoke:
            return Path(tempfile.gettempdir()) / "flatopt-quality-smoke" / OUTPUTS[args.preset]
        return RESULTS / OUTPUTS[args.preset]
    if args.smoke and RESULTS in args.out.resolve().parents:
        parser.error(
            f"--smoke would overwrite the committed results in {RESULTS}; pass "
            "--out /tmp/quality_smoke.json, or leave --out out (a temporary folder)."
        )
    return args.out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sigma")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per task, every task")
    parser.add_argument("--jobs", type=int, default=1, help="run the tasks in N processes")
    parser.add_argument("--tasks", default=None, help="comma-separated task names")
    parser.add_argument("--out", type=Path, default=None, help="the JSON to write")
    parser.add_argument("--plots", type=Path, default=None, help="write PNG plots here")
    parser.add_argument(
        "--replot", type=Path, default=None, help="only redo the .md and plots from this JSON"
    )
    parser.add_argument(
        "--add-to",
        action="store_true",
        help="add the --tasks run here to the existing report at --out (same preset and "
        "settings), e.g. a slow task run on its own",
    )
    args = parser.parse_args(argv)

    if args.replot is not None:
        report = json.loads(args.replot.read_text())
        args.replot.with_suffix(".md").write_text(markdown(report))
        if args.plots is not None:
            plots(report, args.plots)
        return 0

    cfg = PRESETS[args.preset]
    if args.smoke:
        cfg = smoke(cfg)
    if args.seeds is not None:
        cfg = replace(cfg, **{f"{t}_seeds": args.seeds for t in TASKS})
    if args.tasks is not None:
        cfg = replace(cfg, tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()))
    unknown = set(cfg.tasks) - set(TASKS)
    if unknown:
        parser.error(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")
    out = output_path(args, parser)

    start = time.time()
    log = lambda text: print(f"[{time.time() - start:7.1f}s] {text}", flush=True)  # noqa: E731
    command = "python benchmarks/quality.py " + " ".join(argv or sys.argv[1:])
    report = {
        "command": command,
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
        "config": asdict(cfg),
        "arms": [asdict(a) for a in arms(cfg)],
        "tasks": {},
    }
    if args.add_to:
        report, before = added_to(out, report, parser)
        start -= before
    names = list(cfg.tasks)
    if args.jobs > 1:
        with ProcessPoolExecutor(min(args.jobs, len(names))) as pool:
            results = list(pool.map(run_task, names, [cfg] * len(names), [start] * len(names)))
        report["tasks"] = dict(zip(names, results))
    else:  # one task after the other, the report saved after each (a long run keeps them)
        for name in names:
            report["tasks"][name] = run_task(name, cfg, start)
            report["complete"] = set(report["config"]["tasks"]) <= set(report["tasks"])
            report["seconds"] = time.time() - start
            save(report, out)
    report["complete"] = True
    report["seconds"] = time.time() - start
    save(report, out)
    if args.plots is not None:
        plots(report, args.plots)
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def added_to(out: Path, report: dict, parser: argparse.ArgumentParser) -> tuple[dict, float]:
    """The report at ``out``, ready to take this run's tasks, and the seconds it already took."""
    if not out.is_file():
        parser.error(f"--add-to: there is no report at {out} to add to.")
    old = json.loads(out.read_text())
    report = json.loads(json.dumps(report))  # tuples as lists, as in the file
    same = ("preset", "first_seed", "sigmas", "probes", "bits", "epochs_grid")
    if any(old["config"][k] != report["config"][k] for k in same):
        parser.error(f"--add-to: {out} was run with other settings; run the whole preset.")
    for task in report["config"]["tasks"]:
        old["tasks"].pop(task, None)
    old["command"] = f"{old['command']}; {report['command']}"
    tasks = [*old["config"]["tasks"], *report["config"]["tasks"]]
    old["config"].update(
        {k: v for k, v in report["config"].items() if k.split("_")[0] in report["config"]["tasks"]}
    )
    old["config"]["tasks"] = list(dict.fromkeys(tasks))
    return old, old["seconds"]


def save(report: dict, out: Path) -> None:
    add_holm(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
