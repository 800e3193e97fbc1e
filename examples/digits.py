"""Flat-LoRA on real images: adapt a digit classifier to new digits, then corrupt the test set.

A small CNN is pretrained on the handwritten digits 0-4 of scikit-learn's 8×8 ``digits``
dataset. It is then adapted to the digits 5-9 from ``--shots`` labelled images per class: LoRA
on its two linear layers (``flatopt.lora.add_lora``) and a new 5-class head. The adaptation
runs three ways from the same seed:

- plain LoRA;
- Flat-LoRA on the LoRA layers (``flatopt.FlatPerturb``, the paper's default);
- Flat-LoRA on the LoRA layers and the new head (``adapters=[flatopt.dense(model.head)]``).

Each model is tested on held-out 5-9 images, clean and under Gaussian noise, blur and shift of
rising severity, and after rounding its merged weights W + s·B·A to int4.

Run::

    pip install -e ".[evidence]"
    python examples/digits.py              # about 10 seconds
    python examples/digits.py --smoke      # CI

This is one seed, one draw of the few training images: a gap of a point or two between the
columns is mostly that draw. ``benchmarks/quality.py`` runs the same task over 30 paired seeds
(docs/results.md); the script ends by printing that multi-seed result from
``benchmarks/results/quality.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from tqdm import tqdm

import flatopt
from flatopt.lora import LoRALinear, add_lora


class CNN(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def batches(n: int, size: int, generator: torch.Generator):
    return torch.randperm(n, generator=generator).split(size)


def pretrain(x: Tensor, y: Tensor, epochs: int) -> CNN:
    torch.manual_seed(0)
    model = CNN(5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in tqdm(range(epochs), desc="pretrain on 0-4", unit="epoch"):
        for idx in batches(len(y), 32, order):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


def adapt(pretrained: CNN, x: Tensor, y: Tensor, args, mode: str) -> CNN:
    """LoRA on fc1 and fc2 plus a new head; ``mode`` is "plain", "flat" or "flat+head"."""
    torch.manual_seed(args.seed)  # the same head and LoRA init for every mode
    model = copy.deepcopy(pretrained)
    model.head = nn.Linear(64, 5)
    add_lora(model, ["fc1", "fc2"], rank=args.rank, alpha=2 * args.rank)  # freezes the rest
    model.head.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    steps_per_epoch = -(-len(y) // args.batch_size)
    if mode != "plain":
        optimizer = flatopt.FlatPerturb(
            optimizer,
            model,
            sigma=args.sigma,
            total_steps=args.epochs * steps_per_epoch,
            seed=args.seed,
            # The head is a full-rank trainable layer: it is perturbed only when asked.
            adapters=[flatopt.dense(model.head)] if mode == "flat+head" else (),
        )
    order = torch.Generator().manual_seed(args.seed)  # the same batches for every mode
    model.train()
    for _ in tqdm(range(args.epochs), desc=f"{mode:>10}", unit="epoch"):
        for idx in batches(len(y), args.batch_size, order):
            if mode != "plain":
                optimizer.perturb()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            if mode != "plain":
                optimizer.restore()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


def blur(x: Tensor, sigma: float) -> Tensor:
    t = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    return F.conv2d(x, (k[:, None] * k[None, :])[None, None], padding=2)


def shift(x: Tensor, pixels: int) -> Tensor:
    """Move every image ``pixels`` right and down, filling with background."""
    out = torch.zeros_like(x)
    out[..., pixels:, pixels:] = x[..., : 8 - pixels, : 8 - pixels]
    return out


def int4(model: CNN) -> CNN:
    """A copy with every merged trained weight rounded to 4 bits, per row."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in [m for m in model.modules() if isinstance(m, LoRALinear)] + [model.head]:
            w = layer.merged_weight() if isinstance(layer, LoRALinear) else layer.weight
            scale = w.abs().amax(1, keepdim=True) / 7
            rounded = (w / scale).round().clamp(-7, 7) * scale
            if isinstance(layer, LoRALinear):
                layer.base.weight.copy_(rounded)
                layer.lora_B.zero_()
            else:
                layer.weight.copy_(rounded)
    return model


RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "quality.json"


def multi_seed(sigma: float) -> list[str]:
    """The benchmark's paired result for these arms, from its results file, if it is there."""
    if not RESULTS.is_file():
        return ["The multi-seed comparison: benchmarks/quality.py, docs/results.md."]
    summary = json.loads(RESULTS.read_text())["tasks"]["digits"]["summary"]
    lines = []
    for mode, arm in (("flat", f"Flat {sigma:.2f}"), ("flat+head", f"Flat+head {sigma:.2f}")):
        if arm in summary:
            entry = summary[arm]["acc clean"]
            d = entry["diff"]
            lines.append(
                f"  {mode:>9} − plain, clean: {d['mean']:+.2f} points, 95% CI "
                f"[{d['mean'] - d['ci95']:+.2f}, {d['mean'] + d['ci95']:+.2f}], ahead on "
                f"{d['wins']}/{entry['n']} seeds"
            )
    if not lines:
        return [f"No multi-seed run at σ={sigma:g}: see docs/results.md for the σ studied."]
    return ["Over the benchmark's paired seeds (benchmarks/results/quality.json):", *lines]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> str:
    return f"{(model(x).argmax(1) == y).float().mean().item():.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    parser.add_argument("--seed", type=int, default=0, help="the training images and init")
    parser.add_argument("--shots", type=int, default=5, help="training images per class")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args()
    pretrain_epochs = 30
    if args.smoke:
        args.epochs, pretrain_epochs = 2, 1
    torch.set_num_threads(1)

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # pixels in [0, 1]
    y = torch.tensor(digits.target)
    pretrained = pretrain(x[y < 5], y[y < 5], pretrain_epochs)

    new_x, new_y = x[y >= 5], y[y >= 5] - 5
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(len(new_y), generator=g)
    test, pool = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    g.manual_seed(args.seed)
    train = torch.cat(
        [pool[new_y[pool] == c][torch.randperm(int((new_y[pool] == c).sum()), generator=g)]
         [: args.shots] for c in range(5)]
    )  # fmt: skip
    test_x, test_y = new_x[test], new_y[test]
    noise = torch.randn(test_x.shape, generator=torch.Generator().manual_seed(1))
    test_sets = {
        "clean": test_x,
        "noise std 0.2": (test_x + 0.2 * noise).clamp(0, 1),
        "noise std 0.6": (test_x + 0.6 * noise).clamp(0, 1),
        "blur 0.6 px": blur(test_x, 0.6),
        "blur 1.2 px": blur(test_x, 1.2),
        "shift 1 px": shift(test_x, 1),
        "shift 2 px": shift(test_x, 2),
    }

    modes = ("plain", "flat", "flat+head")
    models = {mode: adapt(pretrained, new_x[train], new_y[train], args, mode) for mode in modes}
    print(f"\n{len(train)} training images ({args.shots} per class), {len(test_y)} test images")
    print(f"{'test set':20}" + "".join(f"{m:>12}" for m in modes))
    for name, images in test_sets.items():
        print(f"{name:20}" + "".join(f"{accuracy(models[m], images, test_y):>12}" for m in modes))
    print(
        f"{'clean, int4 weights':20}"
        + "".join(f"{accuracy(int4(models[m]), test_x, test_y):>12}" for m in modes)
    )
    print(
        f"\nThis is one seed (--seed {args.seed}): one draw of the training images. A gap of a "
        "point or two\nbetween the columns is within what changing the seed does."
    )
    print("\n".join(multi_seed(args.sigma)))


if __name__ == "__main__":
    main()
