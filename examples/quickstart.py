"""Quickstart: plain LoRA vs Flat-LoRA (``flatopt.FlatPerturb``) on a few-shot fine-tuning task.

What it shows:

1. "Pretraining": a small MLP learns a synthetic source task (labels from a random teacher
   network) with ordinary full training.
2. A related but shifted target task: the same teacher, seeing its inputs rotated in a few
   planes. The pretrained model does poorly on it, and only a few labelled examples per class
   are available, so fine-tuning can overfit and flatness may matter.
3. The pretrained model is fine-tuned twice with ``flatopt.lora``: once with plain LoRA and once
   with ``flatopt.FlatPerturb`` wrapped around the same AdamW. Data, seeds, learning rate,
   epochs and rank are identical; the only difference is the random weight perturbation.
4. A side-by-side table: final train loss, held-out accuracy (clean and with noisy inputs) and
   ``flatopt.sharpness``, the expected rise of the held-out loss under the Flat-LoRA noise
   law, with both models measured at the same σ and with the same noise seeds.

Everything is synthetic and made here: no downloads, only torch and tqdm.

Run it from the repository root:

    python examples/quickstart.py              # the full demo, well under a minute on a CPU
    python examples/quickstart.py --smoke      # a tiny version, a few seconds (CI)
    python examples/quickstart.py --seed 1 --sigma 0.05

Read the numbers as one run, not a benchmark: on a task this small, a difference of a few
tenths of a percent is within what changing ``--seed`` does. Try several seeds before drawing
a conclusion; the table reports whatever happens.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import flatopt
from flatopt.lora import add_lora


@dataclass(frozen=True)
class Config:
    """Sizes of the demo. ``FULL`` is the default; ``SMOKE`` only checks that it runs."""

    inputs: int = 16  # input features
    classes: int = 6
    teacher_hidden: int = 16
    rotated_planes: int = 4  # the target task rotates this many input planes...
    angle: float = 1.0  # ...by this many radians
    hidden: int = 128  # the student MLP: inputs -> hidden -> hidden -> classes
    source_examples: int = 30_000
    pretrain_epochs: int = 15
    shots: int = 32  # labelled target examples per class
    test_examples: int = 5_000
    input_noise: float = 0.5  # std of the noise in the corrupted copy of the test set
    rank: int = 4
    alpha: float = 8.0
    lr: float = 3e-3
    epochs: int = 50
    batch_size: int = 16
    sharpness_samples: int = 32


FULL = Config()
SMOKE = Config(
    source_examples=2_000,
    pretrain_epochs=2,
    shots=4,
    test_examples=500,
    epochs=3,
    sharpness_samples=4,
)


# -- the tasks ------------------------------------------------------------------------------


def rotation(dim: int, planes: int, angle: float, generator: torch.Generator) -> Tensor:
    """A rotation of ``dim``-space by ``angle`` in ``planes`` random orthogonal planes."""
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
    rotate = torch.eye(dim)
    for i in range(planes):
        u, v = basis[:, 2 * i], basis[:, 2 * i + 1]
        plane = torch.outer(u, u) + torch.outer(v, v)
        turn = torch.outer(v, u) - torch.outer(u, v)
        rotate += (math.cos(angle) - 1) * plane + math.sin(angle) * turn
    return rotate


def make_data(cfg: Config, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Source data, a balanced few-shot target train set, and held-out target test sets."""
    g = torch.Generator().manual_seed(seed)
    teacher_in = torch.randn(cfg.teacher_hidden, cfg.inputs, generator=g) / math.sqrt(cfg.inputs)
    teacher_out = torch.randn(cfg.classes, cfg.teacher_hidden, generator=g)
    rotate = rotation(cfg.inputs, cfg.rotated_planes, cfg.angle, g)

    def source_labels(x: Tensor) -> Tensor:
        return (torch.tanh(x @ teacher_in.T) @ teacher_out.T).argmax(1)

    def target_labels(x: Tensor) -> Tensor:
        return source_labels(x @ rotate.T)  # same teacher, inputs seen through a rotation

    source_x = torch.randn(cfg.source_examples, cfg.inputs, generator=g)
    # Few-shot: keep the first `shots` examples of each class from a larger unlabelled pool.
    pool_x = torch.randn(50 * cfg.shots * cfg.classes, cfg.inputs, generator=g)
    pool_y = target_labels(pool_x)
    keep = torch.cat([(pool_y == c).nonzero().flatten()[: cfg.shots] for c in range(cfg.classes)])
    test_x = torch.randn(cfg.test_examples, cfg.inputs, generator=g)
    test_y = target_labels(test_x)
    noisy_x = test_x + cfg.input_noise * torch.randn(test_x.shape, generator=g)
    return {
        "source": (source_x, source_labels(source_x)),
        "train": (pool_x[keep], pool_y[keep]),
        "test": (test_x, test_y),
        "noisy test": (noisy_x, test_y),
    }


# -- training -------------------------------------------------------------------------------


def pretrain(cfg: Config, data: tuple[Tensor, Tensor], seed: int) -> nn.Module:
    """Ordinary full training on the source task: the "pretrained" model to adapt."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(cfg.inputs, cfg.hidden),
        nn.GELU(),
        nn.Linear(cfg.hidden, cfg.hidden),
        nn.GELU(),
        nn.Linear(cfg.hidden, cfg.classes),
    )
    loader = DataLoader(TensorDataset(*data), batch_size=256, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=cfg.pretrain_epochs * len(loader)
    )
    for _ in tqdm(range(cfg.pretrain_epochs), desc="pretrain  ", unit="epoch"):
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
    return model.eval()


def finetune(
    pretrained: nn.Module, cfg: Config, data: tuple[Tensor, Tensor], seed: int, sigma: float
) -> nn.Module:
    """LoRA fine-tuning; with ``sigma > 0`` the optimizer is wrapped in ``FlatPerturb``.

    Both runs reseed first, so the LoRA init, the batch order and everything else match.
    """
    torch.manual_seed(seed)
    # add_lora works in place and freezes everything but the LoRA factors: adapt a copy.
    # "0", "2" and "4" are the three nn.Linear layers of the Sequential.
    model = add_lora(
        copy.deepcopy(pretrained), ["0", "2", "4"], rank=cfg.rank, alpha=cfg.alpha, dropout=0.0
    )
    model.train()
    loader = DataLoader(TensorDataset(*data), batch_size=cfg.batch_size, shuffle=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr)
    flat = sigma > 0
    if flat:
        # The default "cosine" schedule ramps σ_t from 0 to sigma over total_steps.
        total_steps = cfg.epochs * len(loader)
        optimizer = flatopt.FlatPerturb(
            optimizer, model, sigma=sigma, total_steps=total_steps, seed=seed
        )

    name = "Flat-LoRA " if flat else "plain LoRA"
    bar = tqdm(range(cfg.epochs), desc=name, unit="epoch")
    for _ in bar:
        for x, y in loader:
            if flat:
                optimizer.perturb()  # the forward now sees W + ε; W itself is never written
            loss = F.cross_entropy(model(x), y)
            loss.backward()  # gradients of A and B, taken at the perturbed weights
            if flat:
                optimizer.restore()  # disarm before stepping: the model is bitwise as before
            optimizer.step()
            optimizer.zero_grad()
        # Flat-LoRA's bar shows the loss at the perturbed weights, and σ_t climbing to sigma.
        if flat:
            bar.set_postfix(loss=f"{loss.item():.3f}", sigma_t=f"{optimizer.sigma:.3f}")
        else:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


# -- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    x, y = data
    return (model(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def mean_loss(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    x, y = data
    return F.cross_entropy(model(x), y).item()


def measure_sharpness(
    model: nn.Module, data: tuple[Tensor, Tensor], sigma: float, samples: int, seed: int
) -> flatopt.Sharpness:
    """E_ε[L(W' + ε)] − L(W') on held-out data: how much the loss rises under the noise law."""
    x, y = data
    batches = list(zip(x.split(1000), y.split(1000)))
    return flatopt.sharpness(
        model,
        lambda batch: F.cross_entropy(model(batch[0]), batch[1]),
        batches,
        sigma=sigma,
        samples=samples,
        seed=seed,  # the same seed for both models: they meet the same draws of z
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Plain LoRA vs Flat-LoRA, side by side.")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (CI)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and both runs")
    parser.add_argument(
        "--sigma",
        type=float,
        default=0.1,
        help="Flat-LoRA's σ for training, and the σ sharpness is measured at (default 0.1, "
        "the top of the paper's recommended 0.05-0.10)",
    )
    args = parser.parse_args()
    if not args.sigma > 0:
        parser.error(f"--sigma must be > 0, got {args.sigma}")
    cfg = SMOKE if args.smoke else FULL
    torch.set_num_threads(1)  # the matrices are tiny: extra threads only add overhead

    data = make_data(cfg, args.seed)
    pretrained = pretrain(cfg, data["source"], args.seed)

    results = {}
    for label, sigma in (("plain LoRA", 0.0), ("Flat-LoRA", args.sigma)):
        start = time.perf_counter()
        model = finetune(pretrained, cfg, data["train"], args.seed, sigma)
        seconds = time.perf_counter() - start
        sharp = measure_sharpness(model, data["test"], args.sigma, cfg.sharpness_samples, args.seed)
        results[label] = {
            "final train loss": f"{mean_loss(model, data['train']):.4f}",
            "test accuracy": f"{accuracy(model, data['test']):.2%}",
            "test accuracy, noisy inputs": f"{accuracy(model, data['noisy test']):.2%}",
            "test loss": f"{mean_loss(model, data['test']):.4f}",
            f"test sharpness at σ={args.sigma:g}": f"{sharp.mean:.4f} ± {sharp.stderr:.4f}",
            "fine-tuning time": f"{seconds:.1f} s",
            "sharpness": sharp,
        }

    print()
    print(
        f"Pretrained model: {accuracy(pretrained, data['source']):.1%} on the source task; "
        f"on the target task before fine-tuning {accuracy(pretrained, data['test']):.1%} "
        f"({accuracy(pretrained, data['noisy test']):.1%} with noisy inputs)."
    )
    print(
        f"Fine-tuned on {len(data['train'][1])} labelled target examples ({cfg.shots} per "
        f"class) for {cfg.epochs} epochs, LoRA rank {cfg.rank}, seed {args.seed}."
    )
    print()
    plain, flat = results["plain LoRA"], results["Flat-LoRA"]
    print(f"{'':30}{'plain LoRA':>18}{'Flat-LoRA':>18}")
    for row in plain:
        if row != "sharpness":
            print(f"{row:30}{plain[row]:>18}{flat[row]:>18}")

    # Both sharpness measurements used the same noise seeds, so their per-draw difference is a
    # much tighter comparison than the two separate stderrs suggest.
    diffs = [f - p for f, p in zip(flat["sharpness"].increases, plain["sharpness"].increases)]
    mean = sum(diffs) / len(diffs)
    stderr = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1) / len(diffs))
    print()
    print(
        f"Sharpness, Flat-LoRA minus plain LoRA, paired over {len(diffs)} noise draws: "
        f"{mean:+.4f} ± {stderr:.4f}"
    )
    print("(sharpness: the mean rise of the held-out loss when the weights get Flat-LoRA's noise)")


if __name__ == "__main__":
    main()
