"""Recipe: checkpoint and resume. FlatPerturb's state_dict holds the wrapped optimizer's state
plus the noise seed and step count, so a resumed run continues bit for bit.

    python examples/recipes/resume.py [--smoke]
"""

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import flatopt
from flatopt.lora import add_lora


def build(steps: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))
    add_lora(model, ["0", "2"], rank=4, alpha=8)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt = flatopt.FlatPerturb(inner, model, sigma=0.05, total_steps=steps, seed=0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=steps)
    return model, opt, scheduler


def train(model, opt, scheduler, batches) -> None:
    for x, y in batches:
        with opt.perturbed():
            F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()


def main() -> None:
    parser = argparse.ArgumentParser(description="Checkpoint and resume a Flat-LoRA run.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    steps = 10 if parser.parse_args().smoke else 200
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)) for _ in range(steps)
    ]
    half = steps // 2

    model, opt, scheduler = build(steps)
    train(model, opt, scheduler, batches[:half])
    path = Path(tempfile.mkdtemp()) / "checkpoint.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),  # the inner AdamW's state + flatopt's seed and step
            "scheduler": scheduler.state_dict(),
        },
        path,
    )

    # ... later, in a new process: build everything as before, then load.
    resumed, resumed_opt, resumed_scheduler = build(steps)
    checkpoint = torch.load(path)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    resumed_scheduler.load_state_dict(checkpoint["scheduler"])
    train(resumed, resumed_opt, resumed_scheduler, batches[half:])

    straight, straight_opt, straight_scheduler = build(steps)  # the same run, uninterrupted
    train(straight, straight_opt, straight_scheduler, batches)
    same = all(torch.equal(a, b) for a, b in zip(resumed.parameters(), straight.parameters()))
    assert same and resumed_opt.num_steps == steps
    print(f"resumed at step {half}: after {steps} steps, bitwise the uninterrupted run.")

    # A checkpoint of the bare optimizer (say, plain LoRA before switching to Flat-LoRA) loads
    # too: the optimizer state comes back, flatopt warns, and its own step count is kept, so the
    # σ ramp starts where the wrapper is (here at 0).
    plain = torch.optim.AdamW([p for p in straight.parameters() if p.requires_grad], lr=1e-2)
    _, switched_opt, _ = build(steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        switched_opt.load_state_dict(plain.state_dict())
    print(f"bare optimizer checkpoint: {caught[0].message}")


if __name__ == "__main__":
    main()
