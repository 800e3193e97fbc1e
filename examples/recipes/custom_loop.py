"""Recipe: Flat-LoRA in a hand-written training loop.

python examples/recipes/custom_loop.py [--smoke]
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import flatopt
from flatopt.lora import add_lora


def main() -> None:
    parser = argparse.ArgumentParser(description="Flat-LoRA in a custom training loop.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    steps = 20 if parser.parse_args().smoke else 300
    torch.manual_seed(0)

    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))
    add_lora(model, ["0", "2"], rank=4, alpha=8)  # freezes everything but the LoRA factors
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # σ ramps from 0 to 0.05 over total_steps optimizer steps (the paper's cosine schedule).
    opt = flatopt.FlatPerturb(inner, model, sigma=0.05, total_steps=steps, seed=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)  # on the wrapper
    x, y = torch.randn(512, 16), torch.randn(512, 4)
    frozen = model[0].base.weight.clone()

    for step in range(steps):
        sigma_t = opt.sigma  # this step's σ_t (0 at step 0 on the cosine ramp)
        batch = torch.randint(0, len(x), (32,))
        with opt.perturbed():  # forward *and* backward see W + ε; W itself is never written
            loss = F.mse_loss(model(x[batch]), y[batch])
            loss.backward()
        opt.step()  # after the restore: the wrapped AdamW's step, and the schedule advances
        opt.zero_grad()
        scheduler.step()
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  sigma_t {sigma_t:.4f}")

    assert torch.equal(frozen, model[0].base.weight), "the frozen weight changed"
    print(f"{opt.num_steps} steps; the frozen weights are bitwise what they were.")


if __name__ == "__main__":
    main()
