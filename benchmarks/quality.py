"""Quality: plain LoRA against Flat-LoRA (``flatopt.FlatPerturb``) on two real tasks.

Arms, all with the same learning rate, epochs, rank, LoRA init, training shots and batch order
for a given seed (the pairs differ only in the regulariser):

- ``LoRA``: plain LoRA; the new classification head is trained too.
- ``LoRA+dropout``: LoRA with dropout 0.2 on the LoRA path, a classic regulariser.
- ``Flat σ``: FlatPerturb on the LoRA layers (the paper's default), σ in {0.05, 0.10, 0.15},
  cosine schedule.
- ``Flat+head σ``: the same, plus the new head as a dense target (``flatopt.dense(head)``).

Tasks (see ``benchmarks/_quality_tasks.py``): ``vader``, 5-class valence of single words from
the VADER lexicon with a pretrained MiniLM-L6 encoder (LoRA on its last two layers); and
``digits``, scikit-learn's 8×8 digits, a CNN pretrained on 0-4 and adapted to 5-9 few-shot.

Metrics per run: clean test accuracy; accuracy on a shifted test set (vader: words with high
rater disagreement) and under each corruption at each severity; the accuracy drop after
symmetric per-row int8 / int4 rounding of every merged trained weight (W + s·B·A of the LoRA
layers, and the head); and ``flatopt.sharpness`` at σ = 0.10 on held-out data, over the LoRA
layers alone and over the LoRA layers plus the head.

Statistics: every seed trains every arm, so each arm is compared with plain LoRA through the
per-seed differences: their mean with a t-based 95% confidence interval, a paired t-test
p-value, and the number of seeds on which the arm did better.

Run (about 30 minutes on 2 CPU cores; ``--smoke`` takes seconds)::

    pip install -e ".[evidence]"
    python benchmarks/quality.py --plots docs/img
    python benchmarks/quality.py --smoke --out /tmp/quality_smoke.json

Outputs ``benchmarks/results/quality.json`` and, next to it, ``quality.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quality_tasks import (
    Task,
    digits_task,
    mean_ci,
    quantize_rows,
    vader_task,
)

import flatopt
from flatopt.lora import LoRALinear, add_lora

SHARPNESS_SIGMA = 0.10


@dataclass(frozen=True)
class Arm:
    name: str
    sigma: float = 0.0
    head: bool = False  # perturb the new head too
    dropout: float = 0.0


def arms(sigmas: tuple[float, ...]) -> list[Arm]:
    return [
        Arm("LoRA"),
        Arm("LoRA+dropout", dropout=0.2),
        *[Arm(f"Flat {s:.2f}", sigma=s) for s in sigmas],
        *[Arm(f"Flat+head {s:.2f}", sigma=s, head=True) for s in sigmas],
    ]


@dataclass(frozen=True)
class Config:
    vader_seeds: int = 5
    digits_seeds: int = 30
    sigmas: tuple[float, ...] = (0.05, 0.10, 0.15)
    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-3
    vader_shots: int = 16
    vader_epochs: int = 30
    vader_test_per_class: int = 100
    digits_shots: int = 5
    digits_epochs: int = 60
    digits_pretrain_epochs: int = 30
    sharpness_size: int = 200
    sharpness_samples: int = 8
    vader_pool_per_class: Optional[int] = None  # None: every agreed-on word outside the test


FULL = Config()
SMOKE = Config(
    vader_seeds=2,
    digits_seeds=2,
    sigmas=(0.10,),
    vader_shots=2,
    vader_epochs=1,
    vader_test_per_class=8,
    digits_shots=2,
    digits_epochs=2,
    digits_pretrain_epochs=1,
    sharpness_size=20,
    sharpness_samples=2,
    vader_pool_per_class=8,
)

HIGHER_IS_BETTER = ("acc",)


def higher_is_better(metric: str) -> bool:
    return metric.startswith(HIGHER_IS_BETTER)


# -- one run ------------------------------------------------------------------------------------


def build(task: Task, cfg: Config, arm: Arm, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the head and the LoRA factors: the same init for every arm
    model = task.make_model()
    add_lora(model, task.lora_names, rank=cfg.rank, alpha=cfg.alpha, dropout=arm.dropout)
    model.head.requires_grad_(True)  # the new head is always trained
    return model


def train(task: Task, cfg: Config, arm: Arm, seed: int, epochs: int) -> nn.Module:
    inputs, labels = task.split(seed)
    model = build(task, cfg, arm, seed).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(trainable, lr=cfg.lr)
    batches = math.ceil(len(labels) / task.batch_size)
    flat: Optional[flatopt.FlatPerturb] = None
    if arm.sigma > 0:
        flat = flatopt.FlatPerturb(
            optimizer,
            model,
            sigma=arm.sigma,
            total_steps=epochs * batches,
            seed=seed,
            adapters=[flatopt.dense(model.head)] if arm.head else (),
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
def quantized(model: nn.Module, bits: int) -> nn.Module:
    """A copy whose LoRA layers hold round(W + s·B·A) and whose head holds round(W)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.base.weight.copy_(quantize_rows(module.merged_weight(), bits))
            module.lora_B.zero_()
    model.head.weight.copy_(quantize_rows(model.head.weight, bits))
    return model


def sharpness(model: nn.Module, task: Task, cfg: Config, with_head: bool) -> float:
    inputs, labels = task.sharpness_set
    batches = [
        (tuple(t[idx] for t in inputs), labels[idx]) for idx in torch.arange(len(labels)).split(512)
    ]
    result = flatopt.sharpness(
        model,
        lambda batch: F.cross_entropy(model(*batch[0]), batch[1]),
        batches,
        sigma=SHARPNESS_SIGMA,
        samples=cfg.sharpness_samples,
        seed=777,  # the same draws of z for every arm
        adapters=[flatopt.dense(model.head)] if with_head else (),
    )
    return result.mean


def evaluate(model: nn.Module, task: Task, cfg: Config) -> dict[str, float]:
    metrics = {f"acc {name}": accuracy(model, data) for name, data in task.eval_sets.items()}
    for k in range(len(next(iter(task.severities.values())))):
        names = [levels[k] for levels in task.severities.values()]
        metrics[f"acc corrupted-{k + 1}"] = sum(metrics[f"acc {n}"] for n in names) / len(names)
    for bits in (8, 4):
        clean = accuracy(quantized(model, bits), task.eval_sets["clean"])
        metrics[f"drop int{bits}"] = metrics["acc clean"] - clean
    metrics["sharpness lora"] = sharpness(model, task, cfg, with_head=False)
    metrics["sharpness lora+head"] = sharpness(model, task, cfg, with_head=True)
    return metrics


# -- statistics and reports ---------------------------------------------------------------------


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


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict]]:
    """Per arm and metric: mean ± CI, and against LoRA the paired difference and wins."""
    base = runs["LoRA"]
    summary: dict[str, dict[str, dict]] = {}
    for arm, per_seed in runs.items():
        summary[arm] = {}
        for metric in per_seed[0]:
            values = [r[metric] for r in per_seed]
            mean, ci = mean_ci(values)
            entry = {"mean": mean, "ci95": ci, "n": len(values)}
            if arm != "LoRA":
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


TABLE_METRICS = [
    ("acc clean", "clean acc %"),
    ("acc shifted", "shifted acc %"),
    ("acc corrupted-1", "corr. 1 %"),
    ("acc corrupted-2", "corr. 2 %"),
    ("acc corrupted-3", "corr. 3 %"),
    ("drop int8", "int8 drop"),
    ("drop int4", "int4 drop"),
    ("sharpness lora", "sharp. LoRA"),
    ("sharpness lora+head", "sharp. +head"),
]


def _fmt(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [
        "# Quality: plain LoRA vs Flat-LoRA",
        "",
        f"Generated by `{report['command']}` in {report['seconds'] / 60:.1f} min "
        f"({report['machine']}).",
        "",
    ]
    for task, result in report["tasks"].items():
        summary = result["summary"]
        metrics = [(m, label) for m, label in TABLE_METRICS if m in summary["LoRA"]]
        digits = {m: 4 if m.startswith("sharp") else 2 for m, _ in metrics}
        n = summary["LoRA"]["acc clean"]["n"]
        lines += [f"## {task}", ""]
        lines += [f"- {note}" for note in result["notes"]]
        lines += [
            "",
            f"Mean ± 95% CI over {n} seeds. Accuracies in %, drops in points (clean minus "
            f"quantized), sharpness = E[L(W'+ε)] − L(W') at σ = {SHARPNESS_SIGMA}.",
            "",
            "| arm | " + " | ".join(label for _, label in metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        for arm, entry in summary.items():
            cells = [
                f"{_fmt(entry[m]['mean'], digits[m])} ± {_fmt(entry[m]['ci95'], digits[m])}"
                for m, _ in metrics
            ]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Paired difference arm − LoRA (mean [95% CI]; wins/{n} = seeds where the arm did "
            "better: higher accuracy, smaller drop, lower sharpness). **Bold**: the CI excludes 0.",
            "",
            "| arm | " + " | ".join(label for _, label in metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        for arm, entry in summary.items():
            if arm == "LoRA":
                continue
            cells = []
            for m, _ in metrics:
                d = entry[m]["diff"]
                lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
                text = f"{d['mean']:+.{digits[m]}f} [{lo:+.{digits[m]}f}, {hi:+.{digits[m]}f}]"
                if lo > 0 or hi < 0:
                    text = f"**{text}**"
                cells.append(f"{text} {d['wins']}/{n}")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        details = [m for m in summary["LoRA"] if m.startswith("acc ") and "corrupted" not in m]
        lines += [
            "",
            "Every test set, Δ vs LoRA in points (mean [95% CI], wins):",
            "",
            "| test set | LoRA | " + " | ".join(a for a in summary if a != "LoRA") + " |",
            "|---|---|" + "---|" * (len(summary) - 1),
        ]
        for m in details:
            row = [f"{summary['LoRA'][m]['mean']:.2f}"]
            for arm, entry in summary.items():
                if arm != "LoRA":
                    d = entry[m]["diff"]
                    row.append(f"{d['mean']:+.2f} ±{d['ci95']:.2f} ({d['wins']})")
            lines.append(f"| {m[4:]} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plots(report: dict, folder: Path) -> list[Path]:
    """Accuracy vs corruption severity, sharpness and quantization drop, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
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
                diffs = [summary[arm][m]["diff"] for m in levels]
                offset = (i - len(names) / 2) * 0.03
                axes[1, col].errorbar(
                    [x + offset for x in xs],
                    [d["mean"] for d in diffs],
                    yerr=[d["ci95"] for d in diffs],
                    marker="o",
                    capsize=3,
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


def run_task(name: str, cfg: Config, start: float) -> dict:
    torch.set_num_threads(1)  # tiny matrices: more threads only add overhead
    log = lambda text: print(f"[{time.time() - start:7.1f}s] {text}", flush=True)  # noqa: E731
    if name == "vader":
        task = vader_task(
            cfg.vader_shots,
            cfg.vader_test_per_class,
            cfg.sharpness_size,
            pool_per_class=cfg.vader_pool_per_class,
        )
        epochs, seeds = cfg.vader_epochs, cfg.vader_seeds
    else:
        task = digits_task(cfg.digits_shots, cfg.digits_pretrain_epochs, cfg.sharpness_size)
        epochs, seeds = cfg.digits_epochs, cfg.digits_seeds
    log(f"{name}: data and pretrained model ready")
    runs: dict[str, list[dict[str, float]]] = {arm.name: [] for arm in arms(cfg.sigmas)}
    for seed in range(seeds):
        for arm in arms(cfg.sigmas):
            t0 = time.perf_counter()
            model = train(task, cfg, arm, seed, epochs)
            train_s = time.perf_counter() - t0
            metrics = evaluate(model, task, cfg)
            metrics_s = time.perf_counter() - t0 - train_s
            runs[arm.name].append(metrics)
            log(
                f"{task.name} seed {seed} {arm.name:15} clean {metrics['acc clean']:6.2f} "
                f"corr-3 {metrics['acc corrupted-3']:6.2f} int4 drop {metrics['drop int4']:6.2f} "
                f"sharp {metrics['sharpness lora+head']:.4f}  ({train_s:.1f}+{metrics_s:.1f} s)"
            )
    return {
        "notes": task.notes,
        "corruptions": list(task.severities),
        "epochs": epochs,
        "summary": summarise(runs),
        "per_seed": runs,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell, both tasks")
    parser.add_argument("--jobs", type=int, default=1, help="run the tasks in N processes")
    parser.add_argument("--tasks", default="vader,digits", help="comma-separated task names")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    parser.add_argument("--plots", type=Path, default=None, help="write PNG plots here")
    parser.add_argument(
        "--replot", type=Path, default=None, help="only redo the .md and plots from this JSON"
    )
    args = parser.parse_args(argv)

    if args.replot is not None:
        report = json.loads(args.replot.read_text())
        args.replot.with_suffix(".md").write_text(markdown(report))
        if args.plots is not None:
            plots(report, args.plots)
        return 0

    cfg = SMOKE if args.smoke else FULL
    if args.seeds is not None:
        cfg = Config(**{**asdict(cfg), "vader_seeds": args.seeds, "digits_seeds": args.seeds})
    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(wanted) - {"vader", "digits"}
    if unknown:
        parser.error(f"unknown task(s) {sorted(unknown)}; choose from vader, digits")

    start = time.time()
    log = lambda text: print(f"[{time.time() - start:7.1f}s] {text}", flush=True)  # noqa: E731
    report = {
        "command": "python benchmarks/quality.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
        "config": asdict(cfg),
        "arms": [asdict(a) for a in arms(cfg.sigmas)],
        "sharpness_sigma": SHARPNESS_SIGMA,
        "tasks": {},
    }
    if args.jobs > 1:
        with ProcessPoolExecutor(min(args.jobs, len(wanted))) as pool:
            results = list(pool.map(run_task, wanted, [cfg] * len(wanted), [start] * len(wanted)))
    else:
        results = [run_task(name, cfg, start) for name in wanted]
    report["tasks"] = dict(zip(wanted, results))
    report["seconds"] = time.time() - start

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    if args.plots is not None:
        plots(report, args.plots)
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
