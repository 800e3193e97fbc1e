"""Recipe: Flat-LoRA on a torch.compile'd model.

python examples/recipes/compile.py [--smoke]
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import flatopt
from flatopt.lora import add_lora


def main() -> None:
    parser = argparse.ArgumentParser(description="Flat-LoRA with torch.compile.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    smoke = parser.parse_args().smoke
    steps = 5 if smoke else 100
    torch.manual_seed(0)

    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))
    add_lora(model, ["0", "2"], rank=4, alpha=8)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # Build FlatPerturb first: it installs its hooks on the LoRA layers, and torch.compile
    # must see them at the compiled model's first call. They run eagerly (graph breaks
    # around each target layer); everything between them is compiled.
    opt = flatopt.FlatPerturb(inner, model, sigma=0.05, schedule="constant", seed=0)
    compiled = torch.compile(model, backend="aot_eager" if smoke else "inductor")
    x, y = torch.randn(256, 16), torch.randn(256, 4)
    frozen = model[0].base.weight.clone()

    clean = compiled(x).detach()
    for _ in range(steps):
        with opt.perturbed():
            output = compiled(x)
            F.mse_loss(output, y).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(output, clean), "the compiled forward saw no noise"
    assert torch.equal(model[0].base.weight, frozen), "a frozen weight changed"
    print(f"{steps} compiled steps, final loss {F.mse_loss(compiled(x), y).item():.4f}")


if __name__ == "__main__":
    main()
