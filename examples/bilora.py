"""Bi-LoRA: an adversarial low-rank perturbation trained in the same pass, with ``flatopt.BiLoRA``.

Every LoRA target gets an auxiliary module B₂A₂ (rank 8) that the training forward adds to the
weight; it ascends while the LoRA factors descend, and after every step one global clip keeps
√(Σ ‖B₂A₂‖_F²) ≤ ρ. One forward and backward per step, like plain LoRA and Flat-LoRA, so it
works with gradient accumulation and ``auto=True`` for trainers.

On a synthetic few-shot task (a small MLP "pretrained" on one teacher, then LoRA-adapted to a
shifted teacher from a few labelled points) this trains plain LoRA and Bi-LoRA from the same
init and batch order, then prints held-out accuracy, the auxiliary norm after each epoch,
`flatopt.sharpness`, and checks that the frozen weights were never written and that the
auxiliary factors are nowhere in the model's state dict. One task and one seed show how to use
it, not which method wins.

    python examples/bilora.py            # some seconds on a CPU
    python examples/bilora.py --smoke    # a tiny version (CI)
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flatopt
from flatopt.lora import add_lora

DIM, HIDDEN, CLASSES = 16, 64, 4


def teacher(x: Tensor, shift: Tensor) -> Tensor:
    base = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    return (x @ (base + shift).t()).argmax(1)


def pretrained(steps: int) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, DIM, generator=g)
    y = teacher(x, torch.zeros(CLASSES, DIM))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def task(shots: int) -> dict[str, tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(2)
    shift = 1.5 * torch.randn(CLASSES, 1, generator=g) @ torch.randn(1, DIM, generator=g)
    train, test = torch.randn(shots, DIM, generator=g), torch.randn(4096, DIM, generator=g)
    return {"train": (train, teacher(train, shift)), "test": (test, teacher(test, shift))}


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    x, y = data
    return 100 * (model(x).argmax(1) == y).float().mean().item()


def finetune(base: nn.Module, data, bilora: bool, args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)  # the same LoRA init for both runs
    model = add_lora(copy.deepcopy(base), ["0", "2"], rank=4, alpha=8).train()
    keys = list(model.state_dict())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt = flatopt.BiLoRA(inner, model, rho=args.rho, rank=8, seed=0) if bilora else inner
    x, y = data
    order = torch.Generator().manual_seed(0)  # the same batches for both runs
    for step in range(args.steps):
        idx = torch.randperm(len(y), generator=order)[: args.batch]
        if bilora:
            with opt.perturbed():  # training forwards see W + s·B₁A₁ + B₂A₂
                for part in idx.chunk(2):  # two micro-batches: both see the same B₂A₂
                    (F.cross_entropy(model(x[part]), y[part]) / 2).backward()
        else:
            for part in idx.chunk(2):
                (F.cross_entropy(model(x[part]), y[part]) / 2).backward()
        opt.step()  # BiLoRA: descent on B₁, A₁, ascent on B₂, A₂, then the clip
        opt.zero_grad()
        if bilora and (step + 1) % max(1, args.steps // 4) == 0:
            print(f"  step {step + 1:4d}: ‖B₂A₂‖ over all targets = {float(opt.aux_norm()):.4f}")
    for name, value in frozen.items():
        assert torch.equal(model.get_parameter(name), value), f"{name} was written"
    assert list(model.state_dict()) == keys  # B₂, A₂ belong to the wrapper, not the model
    return model.eval()  # eval sees W + s·B₁A₁: the deployable model


def main() -> None:
    parser = argparse.ArgumentParser(description="LoRA vs Bi-LoRA on a few-shot task.")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (CI)")
    parser.add_argument("--rho", type=float, default=0.05, help="Bi-LoRA's radius ρ")
    args = parser.parse_args()
    args.steps, args.batch, shots, pre = (12, 8, 32, 50) if args.smoke else (300, 16, 64, 400)
    base = pretrained(pre)
    data = task(shots)
    test = data["test"]
    loss = lambda batch: F.cross_entropy(model(batch[0]), batch[1])  # noqa: E731
    for bilora in (False, True):
        print("Bi-LoRA" if bilora else "LoRA")
        model = finetune(base, data["train"], bilora, args)
        rise = flatopt.sharpness(model, loss, [test], sigma=0.05, samples=4, seed=0)
        print(f"  held-out accuracy {accuracy(model, test):5.1f}%, sharpness {rise.mean:.4f}")


if __name__ == "__main__":
    main()
