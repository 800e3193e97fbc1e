"""Recipe: mixed precision. A bf16 autocast forward, and an fp16 loop with GradScaler: a step
the scaler skips (inf/NaN gradients) leaves nothing perturbed and does not advance the schedule.

    python examples/recipes/amp.py [--smoke]
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import flatopt
from flatopt.lora import add_lora


def build(steps: int, device: str) -> tuple[nn.Module, flatopt.FlatPerturb]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))
    add_lora(model, ["0", "2"], rank=4, alpha=8)
    model.to(device)  # fp32 weights: autocast casts them (W + ε included) for each matmul
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, flatopt.FlatPerturb(inner, model, sigma=0.05, total_steps=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description="Flat-LoRA with autocast and GradScaler.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    steps = 10 if parser.parse_args().smoke else 200
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = torch.randn(512, 16, device=device), torch.randn(512, 4, device=device)

    # 1. bf16 autocast: no scaler needed.
    model, opt = build(steps, device)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (32,), device=device)
        with opt.perturbed():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = F.mse_loss(model(x[batch]).float(), y[batch])
            loss.backward()  # backward outside autocast, inside perturbed()
        opt.step()
        opt.zero_grad()
    print(f"bf16 autocast: {opt.num_steps} steps, loss {loss.item():.4f}")

    # 2. fp16 autocast with a GradScaler.
    model, opt = build(steps, device)
    scaler = torch.amp.GradScaler(device)
    skipped = 0
    for step in range(steps):
        batch = torch.randint(0, len(x), (32,), device=device)
        inputs = x[batch]
        if step == 2:
            inputs = inputs.clone()
            inputs[0, 0] = float("inf")  # a bad batch: the scaler will skip this step
        with opt.perturbed():
            with torch.autocast(device, dtype=torch.float16):
                loss = F.mse_loss(model(inputs).float(), y[batch])
            scaler.scale(loss).backward()
        # restore() ran before the scaler: skipped or not, nothing is left perturbed.
        before = opt.num_steps
        scaler.step(opt)  # calls opt.step() only if the gradients are finite
        scaler.update()
        opt.zero_grad()
        skipped += opt.num_steps == before  # a skipped step does not advance the schedule
    assert skipped >= 1 and opt.num_steps == steps - skipped
    print(f"fp16 + GradScaler: {opt.num_steps} steps taken, {skipped} skipped by the scaler")


if __name__ == "__main__":
    main()
