"""Quickstart: what Flat-LoRA (``flatopt.FlatPerturb``) does to a model, measured in seconds.

The task: few-shot adaptation under a distribution shift, with every layer LoRA-adapted.

1. "Pretraining": a small MLP (8×8 image -> 128 -> 128 -> 10) learns scikit-learn's handwritten
   digits, upright, from one half of the images.
2. The shift: the other half of the images, rotated by 45°. The pretrained model does poorly on
   them, and only 5 labelled rotated images per class are available for adaptation.
3. Adaptation with ``flatopt.lora`` on all three layers, the head included: once with plain
   LoRA and once per σ with ``flatopt.FlatPerturb`` around the same AdamW. For one seed the
   training images, LoRA init and batch order are identical in every run: the runs differ
   only in the noise. Every seed in ``--seeds`` is run and reported; none is dropped.
4. What is printed, and drawn to ``examples/quickstart.png``:
   - the mechanism: ``flatopt.sharpness``, the mean rise of the held-out loss when the weights
     get Flat-LoRA's noise, against the probe σ of that noise. A model trained with a larger σ
     should have a lower curve: that is what Flat-LoRA optimises;
   - the outcome: held-out accuracy per seed as it falls, and the mean paired difference
     against plain LoRA with its 95% confidence interval and the number of seeds ahead.

Everything runs offline: the digits ship with scikit-learn.

Run it from the repository root (``pip install -e ".[examples]"`` first):

    python examples/quickstart.py              # 10 seeds, well under a minute on a CPU
    python examples/quickstart.py --smoke      # a tiny version, a few seconds (CI)
    python examples/quickstart.py --seeds 20 --sigmas 0.1,0.3

Ten seeds give a rough interval. ``benchmarks/quality.py`` runs this task (``rotated``) with
40 seeds, on 8 more pretrained models, and next to two other tasks: docs/results.md has what
they show, and docs/choosing-sigma.md how to choose σ.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

import flatopt
from flatopt.lora import add_lora


@dataclass(frozen=True)
class Config:
    """Sizes of the demo. ``FULL`` is the default; ``SMOKE`` only checks that it runs."""

    seeds: int = 10  # seeds 0, 1, ..., seeds - 1: every one is run and reported
    sigmas: tuple[float, ...] = (0.05, 0.2, 0.5)  # Flat-LoRA's training σ (cosine schedule)
    probes: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)  # the σ sharpness is measured at
    degrees: float = 45.0  # the distribution shift: the target images are rotated this much
    noise: float = 0.4  # std of the pixel noise of the second test set (pixels in [0, 1])
    shots: int = 5  # labelled target images per class
    pretrain_epochs: int = 40
    epochs: int = 60
    batch_size: int = 10
    rank: int = 4
    alpha: float = 8.0
    lr: float = 3e-3
    sharpness_samples: int = 8


FULL = Config()
SMOKE = Config(seeds=2, sigmas=(0.5,), pretrain_epochs=2, epochs=3, sharpness_samples=2)


# -- the task -------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def rotate(images: Tensor, degrees: float) -> Tensor:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]]).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def make_task(cfg: Config) -> dict:
    """The pretrained model, the rotated test set and the pool the few shots come from."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # pixels in [0, 1]
    y = torch.tensor(digits.target)
    half = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    source, target = half[: len(y) // 2], half[len(y) // 2 :]

    torch.manual_seed(0)
    pretrained = MLP()  # ordinary full training on upright digits
    optimizer = torch.optim.AdamW(pretrained.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(cfg.pretrain_epochs):
        for idx in source[torch.randperm(len(source), generator=order)].split(32):
            F.cross_entropy(pretrained(x[idx]), y[idx]).backward()
            optimizer.step()
            optimizer.zero_grad()

    shifted_x, shifted_y = rotate(x[target], cfg.degrees), y[target]
    split = torch.randperm(len(target), generator=torch.Generator().manual_seed(1))
    test, pool = split[: len(split) // 2], split[len(split) // 2 :]
    test_x = shifted_x[test]
    noise = cfg.noise * torch.randn(test_x.shape, generator=torch.Generator().manual_seed(2))
    return {
        "pretrained": pretrained.eval(),
        "source": (x[source], y[source]),
        "test": (test_x, shifted_y[test]),
        "noisy test": ((test_x + noise).clamp(0, 1), shifted_y[test]),
        "pool": (shifted_x[pool], shifted_y[pool]),
    }


def few_shot(pool: tuple[Tensor, Tensor], shots: int, seed: int) -> tuple[Tensor, Tensor]:
    """``shots`` random images of each class: the training set of one seed."""
    x, y = pool
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(10):
        members = (y == c).nonzero().flatten()
        picks.append(members[torch.randperm(len(members), generator=g)[:shots]])
    idx = torch.cat(picks)
    return x[idx], y[idx]


# -- training and measuring -----------------------------------------------------------------


def finetune(pretrained: nn.Module, cfg: Config, data, seed: int, sigma: float) -> nn.Module:
    """LoRA on every layer; with ``sigma > 0`` the optimizer is wrapped in ``FlatPerturb``."""
    torch.manual_seed(seed)  # the same LoRA init for every σ
    # add_lora works in place and freezes everything but the LoRA factors: adapt a copy.
    model = add_lora(
        copy.deepcopy(pretrained), ["fc1", "fc2", "head"], rank=cfg.rank, alpha=cfg.alpha
    )
    x, y = data
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    steps = cfg.epochs * math.ceil(len(y) / cfg.batch_size)
    flat = None
    if sigma > 0:
        # The default "cosine" schedule ramps σ_t from 0 to sigma over total_steps.
        flat = optimizer = flatopt.FlatPerturb(
            optimizer, model, sigma=sigma, total_steps=steps, seed=seed
        )
    order = torch.Generator().manual_seed(seed)  # the same batches for every σ
    model.train()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(y), generator=order).split(cfg.batch_size):
            if flat is not None:
                flat.perturb()  # the forward now sees W + ε; W itself is never written
            F.cross_entropy(model(x[idx]), y[idx]).backward()  # gradients at W + ε
            if flat is not None:
                flat.restore()  # disarm before stepping: the model is bitwise as before
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    x, y = data
    return 100 * (model(x).argmax(1) == y).float().mean().item()


def sharpness_curve(model: nn.Module, data, cfg: Config) -> list[float]:
    """E_ε[L(W' + ε)] − L(W') on held-out data, at every probe σ, in one call."""
    results = flatopt.sharpness(
        model,
        lambda batch: F.cross_entropy(model(batch[0]), batch[1]),
        [data],
        sigma=cfg.probes,
        samples=cfg.sharpness_samples,
        seed=0,  # every model meets the same draws of z
    )
    return [r.mean for r in results]


# -- statistics and output ------------------------------------------------------------------

# Student's t at 97.5%, from printed tables: the half-width of a 95% CI is t · stderr.
# fmt: off
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
         16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}
# fmt: on


def mean_ci(values: list[float]) -> tuple[float, float]:
    """The mean and the half-width of its t-based 95% confidence interval."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    df = len(values) - 1
    t = T_975.get(df) or T_975[max(k for k in T_975 if k <= df)]  # a little wide between rows
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def plot(path: Path, cfg: Config, curves: dict, deltas: dict, seeds: range) -> None:
    """Sharpness against the probe σ, and every seed's paired accuracy difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(deltas), figsize=(5 * (1 + len(deltas)), 4.2))
    colours = plt.get_cmap("viridis")
    colour = {
        name: "black" if i == 0 else colours(i / len(curves)) for i, name in enumerate(curves)
    }
    for name, per_seed in curves.items():
        stats = [mean_ci([c[k] for c in per_seed]) for k in range(len(cfg.probes))]
        axes[0].errorbar(
            cfg.probes,
            [m for m, _ in stats],
            yerr=[h for _, h in stats],
            marker="o",
            capsize=3,
            color=colour[name],
            label=name,
        )
    axes[0].set_xlabel("probe σ of the noise")
    axes[0].set_ylabel("E[L(W'+ε)] − L(W') on held-out images")
    axes[0].set_title("Sharpness (lower = flatter), mean and 95% CI")
    axes[0].legend(fontsize=8)
    for ax, (title, paired) in zip(axes[1:], deltas.items()):
        for i, (name, values) in enumerate(paired.items(), start=1):
            mean, half = mean_ci(values)
            ax.scatter([i] * len(values), values, color=colour[name], alpha=0.5, s=14)
            ax.errorbar(i + 0.15, mean, yerr=half, marker="D", capsize=4, color="black")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(1, len(paired) + 1), list(paired))
        ax.set_ylabel("accuracy − plain LoRA's, same seed (points)")
        ax.set_title(f"{title}: seeds {seeds.start}-{seeds.stop - 1}, mean, 95% CI", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="Plain LoRA vs Flat-LoRA, seed by seed.")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1 (default 10)")
    parser.add_argument("--sigmas", default=None, help="Flat-LoRA's training σ, e.g. 0.1,0.3")
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("quickstart.png"))
    args = parser.parse_args()
    cfg = SMOKE if args.smoke else FULL
    if args.seeds is not None:
        cfg = replace(cfg, seeds=args.seeds)
    if args.sigmas is not None:
        cfg = replace(cfg, sigmas=tuple(float(s) for s in args.sigmas.split(",")))
    if cfg.seeds < 2 or not all(s > 0 for s in cfg.sigmas):
        parser.error("pass --seeds 2 or more (a CI needs two) and --sigmas above 0")
    torch.set_num_threads(1)  # the matrices are tiny: extra threads only add overhead

    task = make_task(cfg)
    seeds = range(cfg.seeds)
    arms = {"plain LoRA": 0.0, **{f"Flat σ={s:g}": s for s in cfg.sigmas}}
    print(
        f"Pretrained on upright digits: {accuracy(task['pretrained'], task['source']):.1f}% "
        f"(train); on the {len(task['test'][1])} rotated test images before adaptation: "
        f"{accuracy(task['pretrained'], task['test']):.1f}%.\n"
        f"Adapting to digits rotated by {cfg.degrees:g}° from {cfg.shots} images per class, "
        f"{cfg.epochs} epochs, LoRA rank {cfg.rank} on every layer, seeds "
        f"{seeds.start}-{seeds.stop - 1}.\n"
    )
    print(f"{'test accuracy %':>16}" + "".join(f"{name:>14}" for name in arms))
    accuracies: dict[str, dict[str, list[float]]] = {"test": {}, "noisy test": {}}
    curves: dict[str, list[list[float]]] = {name: [] for name in arms}
    seconds = dict.fromkeys(arms, 0.0)
    for seed in seeds:
        data = few_shot(task["pool"], cfg.shots, seed)
        for name, sigma in arms.items():
            start = time.perf_counter()
            model = finetune(task["pretrained"], cfg, data, seed, sigma)
            seconds[name] += time.perf_counter() - start
            for test_set, values in accuracies.items():
                values.setdefault(name, []).append(accuracy(model, task[test_set]))
            curves[name].append(sharpness_curve(model, task["test"], cfg))
        row = "".join(f"{accuracies['test'][name][-1]:14.1f}" for name in arms)
        print(f"{'seed ' + str(seed):>16}{row}")

    deltas: dict[str, dict[str, list[float]]] = {}
    for test_set, title in (
        ("test", "the rotated test images"),
        ("noisy test", f"the same images with pixel noise of std {cfg.noise:g}"),
    ):
        values = accuracies[test_set]
        plain = values["plain LoRA"]
        paired = {n: [a - p for a, p in zip(values[n], plain)] for n in arms if n != "plain LoRA"}
        deltas[title] = paired
        print(f"\nAccuracy on {title}, over the {len(seeds)} seeds")
        print("(paired: each run minus plain LoRA's on the same seed):")
        print(f"{'':16}{'mean acc %':>12}{'Δ vs plain, 95% CI':>26}{'seeds ahead':>13}")
        for name in arms:
            mean, _ = mean_ci(values[name])
            cells = ""
            if name in paired:
                d, half = mean_ci(paired[name])
                ahead = f"{sum(x > 0 for x in paired[name])}/{len(seeds)}"
                cells = f"{f'{d:+.2f} [{d - half:+.2f}, {d + half:+.2f}]':>26}{ahead:>13}"
            print(f"{name:16}{mean:12.2f}{cells}")

    print("\nFine-tuning time, all seeds, on this machine (for orientation only; what the noise")
    print("costs per step is measured by benchmarks/overhead.py, see docs/performance.md):")
    print("".join(f"{name:>16}: {seconds[name]:.1f} s" for name in arms))

    print("\nSharpness on the held-out images, E[L(W'+ε)] − L(W'): the mean rise of the loss")
    print(
        "when the weights get Flat-LoRA's noise at the probe σ (mean over seeds; lower = flatter)"
    )
    print(f"{'probe σ':>16}" + "".join(f"{name:>14}" for name in arms))
    for k, probe in enumerate(cfg.probes):
        row = [statistics.fmean(c[k] for c in curves[name]) for name in arms]
        print(f"{probe:16g}" + "".join(f"{value:14.4f}" for value in row))

    plot(args.png, cfg, curves, deltas, seeds)
    print(f"\nPlot: {args.png}")
    print(
        f"{len(seeds)} seeds give a rough interval: docs/results.md has this task with 40 seeds "
        "and 8 pretrained models."
    )


if __name__ == "__main__":
    main()
