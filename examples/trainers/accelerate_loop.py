"""Trainers: Flat-LoRA in an Accelerate loop with gradient accumulation.

python examples/trainers/accelerate_loop.py [--smoke] [--mixed-precision bf16]

``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``, whose ``step()``
reaches the FlatPerturb only at the end of each accumulation window. With ``auto=True`` the
loop is Accelerate's own, unchanged. The AcceleratedOptimizer does not forward ``perturbed``,
``sigma`` or ``num_steps``: ``flatopt.unwrap(opt)`` reaches them, here to log σ_t. The GPT-2
is built from a config: nothing downloads.
"""

import argparse

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

import flatopt


def counting(count: int, length: int = 16, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """Sequences a, a+k, a+2k, ... (mod vocab): a toy language to learn."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (count, 1), generator=g)
    strides = torch.randint(1, 4, (count, 1), generator=g)
    return (starts + strides * torch.arange(length)) % vocab


def main() -> None:
    parser = argparse.ArgumentParser(description="Flat-LoRA in an Accelerate loop.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--mixed-precision", default="no", help='"no" or "bf16"')
    args = parser.parse_args()
    epochs, examples, accumulate = (1, 64, 2) if args.smoke else (10, 1024, 2)
    torch.manual_seed(0)

    accelerator = Accelerator(
        cpu=True, gradient_accumulation_steps=accumulate, mixed_precision=args.mixed_precision
    )
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=64, n_layer=2, n_head=4)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    model = get_peft_model(GPT2LMHeadModel(config), lora)
    train = DataLoader(counting(examples), batch_size=8, shuffle=True)
    evals = DataLoader(counting(examples // 8, seed=1), batch_size=8)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    total = epochs * (len(train) // accumulate)  # optimizer steps, not batches
    opt = flatopt.FlatPerturb(inner, model, sigma=0.05, total_steps=total, seed=0, auto=True)

    model, opt, train, evals = accelerator.prepare(model, opt, train, evals)
    for epoch in range(epochs):
        model.train()
        for batch in train:
            with accelerator.accumulate(model):
                loss = model(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
                opt.step()  # reaches the FlatPerturb once per accumulation window
                opt.zero_grad()
        model.eval()  # evaluation sees the clean W
        with torch.no_grad():
            val = torch.stack([model(input_ids=b, labels=b).loss for b in evals]).mean()
        flat = flatopt.unwrap(opt)
        print(
            f"epoch {epoch}  val loss {val:.4f}  steps {flat.num_steps}  sigma_t {flat.sigma:.4f}"
        )


if __name__ == "__main__":
    main()
