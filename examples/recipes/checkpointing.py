"""Recipe: activation checkpointing. The backward re-runs checkpointed forwards, so it must run
inside perturbed(): the re-run then sees the same ε as the first forward.

    python examples/recipes/checkpointing.py [--smoke]
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import flatopt
from flatopt.lora import add_lora


class Net(nn.Module):
    def __init__(self, width: int = 64, depth: int = 4):
        super().__init__()
        self.stem = nn.Linear(16, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth)
        )
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:  # activations of each block are recomputed in backward
            h = h + checkpoint(block, h, use_reentrant=False)
        return self.head(h)


def main() -> None:
    parser = argparse.ArgumentParser(description="Flat-LoRA with activation checkpointing.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    steps = 10 if parser.parse_args().smoke else 200
    torch.manual_seed(0)

    model = Net()
    add_lora(model, rank=4, alpha=8)  # every nn.Linear, inside the checkpointed blocks too
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt = flatopt.FlatPerturb(inner, model, sigma=0.05, total_steps=steps)
    x, y = torch.randn(512, 16), torch.randn(512, 4)

    for step in range(steps):
        sigma_t = opt.sigma  # this step's σ_t (0 at step 0 on the cosine ramp)
        batch = torch.randint(0, len(x), (32,))
        with opt.perturbed():
            loss = F.mse_loss(model(x[batch]), y[batch])
            loss.backward()  # re-runs the blocks: still armed, so they see the same W + ε
        opt.step()
        opt.zero_grad()
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  sigma_t {sigma_t:.4f}")
    print(f"{opt.num_steps} steps over {len(opt.targets)} perturbed layers.")


if __name__ == "__main__":
    main()
