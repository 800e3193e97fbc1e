"""LoRA-SAM: sharpness-aware minimization on the LoRA factors, with ``flatopt.sam.LoRASAM``.

SAM takes each step with the gradient at θ + ε, ε = ρ·g/‖g‖: two forward and backward passes
per step, so the loop hands ``step`` a closure. Here, on a synthetic few-shot task (a small MLP
"pretrained" on one teacher, then LoRA-adapted to a shifted teacher from a few labelled
points), the same LoRA run is trained three ways from the same init and batch order:

- plain LoRA (AdamW),
- LoRA-SAM (``LoRASAM`` around the same AdamW), with gradient accumulation inside the closure,
- Flat-LoRA (``FlatPerturb``), the one-pass alternative, for comparison.

It prints held-out accuracy, ``flatopt.sharpness`` (the mean loss rise under Flat-LoRA's
noise) and the time per step, and checks that the frozen weights were never written.
One synthetic task and a few seeds show how to use it, not which method wins.

    python examples/lora_sam.py            # 3 seeds, some seconds on a CPU
    python examples/lora_sam.py --smoke    # a tiny version (CI)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flatopt
from flatopt.lora import add_lora
from flatopt.sam import LoRASAM

DIM, HIDDEN, CLASSES = 16, 64, 4


def teacher(x: Tensor, shift: Tensor) -> Tensor:
    """The labels: the argmax of a fixed random linear map, moved by ``shift`` for the task."""
    base = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    return (x @ (base + shift).t()).argmax(1)


def pretrained(steps: int) -> nn.Module:
    """An MLP fully trained on the unshifted teacher: the frozen base of the adaptation."""
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
    """A low-rank shift of the teacher; ``shots`` labelled points to adapt on, many to test."""
    g = torch.Generator().manual_seed(2)
    shift = 1.5 * torch.randn(CLASSES, 1, generator=g) @ torch.randn(1, DIM, generator=g)
    train, test = torch.randn(shots, DIM, generator=g), torch.randn(4096, DIM, generator=g)
    return {"train": (train, teacher(train, shift)), "test": (test, teacher(test, shift))}


def finetune(base: nn.Module, data, method: str, seed: int, cfg: argparse.Namespace):
    """LoRA on both layers; ``method`` is "lora", "lora-sam" or "flat-lora". Returns the model
    and the mean seconds per optimizer step."""
    torch.manual_seed(seed)  # the same LoRA init for every method
    model = add_lora(copy.deepcopy(base), ["0", "2"], rank=4, alpha=8).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if method == "lora-sam":
        opt = LoRASAM(inner, model, rho=cfg.rho)
    elif method == "flat-lora":
        opt = flatopt.FlatPerturb(inner, model, sigma=0.1, total_steps=cfg.steps, seed=seed)
    else:
        opt = inner
    x, y = data
    order = torch.Generator().manual_seed(seed)  # the same batches for every method
    start = time.perf_counter()
    for _ in range(cfg.steps):
        idx = torch.randperm(len(y), generator=order)[: cfg.batch]
        micro = idx.chunk(cfg.accumulate)

        def closure(micro=micro) -> Tensor:
            # The whole step's gradient, every micro-batch, inside the closure: SAM runs it
            # at θ and again at θ + ε. (LoRASAM clears the gradients before each pass.)
            total = torch.zeros(())
            for part in micro:
                loss = F.cross_entropy(model(x[part]), y[part]) / len(micro)
                loss.backward()
                total = total + loss.detach()
            return total

        if method == "flat-lora":
            with opt.perturbed():  # one pass at W + ε; W itself is never written
                closure()
            opt.step()
        else:
            opt.step(closure)  # LoRA-SAM: two passes, at θ and θ + ε; AdamW: one
        opt.zero_grad()
    seconds = (time.perf_counter() - start) / cfg.steps
    for name, value in frozen.items():  # LoRASAM moves only the factors, restored bitwise
        assert torch.equal(model.get_parameter(name), value), f"{name} was written"
    return model.eval(), seconds


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    x, y = data
    return 100 * (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description="LoRA vs LoRA-SAM vs Flat-LoRA, seed by seed.")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (CI)")
    parser.add_argument("--rho", type=float, default=0.05, help="LoRA-SAM's radius ρ")
    args = parser.parse_args()
    args.seeds, args.steps, pretrain = (1, 5, 20) if args.smoke else (3, 300, 1500)
    args.batch, args.accumulate, shots = 32, 2, 64
    torch.set_num_threads(1)  # the matrices are tiny: extra threads only add overhead

    base, data = pretrained(pretrain), task(shots)
    print(f"pretrained model on the shifted task: {accuracy(base, data['test']):.1f}% test")
    methods = ("lora", "lora-sam", "flat-lora")
    print(f"{'seed':>6}" + "".join(f"{m + ' acc %':>16}" for m in methods))
    results = {m: {"acc": [], "sharp": [], "sec": []} for m in methods}
    for seed in range(args.seeds):
        row = f"{seed:>6}"
        for method in methods:
            model, seconds = finetune(base, data["train"], method, seed, args)
            x, y = data["test"]
            rise = flatopt.sharpness(
                model,
                lambda b, m=model: F.cross_entropy(m(b[0]), b[1]),
                [(x, y)],
                sigma=0.1,
                samples=4,
                seed=0,
            )
            results[method]["acc"].append(accuracy(model, data["test"]))
            results[method]["sharp"].append(rise.mean)
            results[method]["sec"].append(seconds)
            row += f"{results[method]['acc'][-1]:16.1f}"
        print(row)
    lora_seconds = sum(results["lora"]["sec"])
    print(f"\n{'':12}{'mean acc %':>12}{'sharpness σ=0.1':>18}{'time / LoRA':>14}")
    for method, r in results.items():
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        print(
            f"{method:12}{mean(r['acc']):12.2f}{mean(r['sharp']):18.4f}"
            f"{sum(r['sec']) / lora_seconds:14.2f}"
        )
    print(
        "\nLoRA-SAM runs two passes per step, Flat-LoRA one; the frozen weights were never written."
    )


if __name__ == "__main__":
    main()
