"""Recipe: gradient accumulation. With resample="step" (the default) every micro-batch of one
optimizer step sees the same ε, and the σ schedule counts optimizer steps, not micro-batches.

    python examples/recipes/accumulation.py [--smoke]
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import flatopt
from flatopt.lora import add_lora


def main() -> None:
    parser = argparse.ArgumentParser(description="Flat-LoRA with gradient accumulation.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    steps = 10 if parser.parse_args().smoke else 200  # optimizer steps
    accumulate = 4  # micro-batches per optimizer step
    torch.manual_seed(0)

    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))
    add_lora(model, ["0", "2"], rank=4, alpha=8)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # total_steps counts optimizer steps, not micro-batches: with a loader of micro-batches,
    # total_steps = epochs * (len(loader) // accumulate). The ramp is then the same whatever
    # `accumulate` is.
    opt = flatopt.FlatPerturb(inner, model, sigma=0.05, total_steps=steps, resample="step")
    x, y = torch.randn(2048, 16), torch.randn(2048, 4)

    for step in range(steps):
        sigma_t = opt.sigma  # this step's σ_t (0 at step 0 on the cosine ramp)
        batch = torch.randint(0, len(x), (32 * accumulate,))
        for micro_x, micro_y in zip(x[batch].chunk(accumulate), y[batch].chunk(accumulate)):
            with opt.perturbed():  # the same ε for every micro-batch of this step
                loss = F.mse_loss(model(micro_x), micro_y) / accumulate
                loss.backward()  # gradients add up across micro-batches
        opt.step()  # one optimizer step: the schedule advances once
        opt.zero_grad()
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  loss {accumulate * loss.item():.4f}  sigma_t {sigma_t:.4f}")

    assert opt.num_steps == steps
    print(f"{opt.num_steps} optimizer steps of {accumulate} micro-batches each.")


if __name__ == "__main__":
    main()
