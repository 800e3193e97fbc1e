"""Trainers: Flat-LoRA in pytorch-lightning's manual optimization.

python examples/trainers/lightning_manual.py [--smoke] [--explicit]

With ``auto=True`` the manual loop is the usual one: forward, ``manual_backward``, and
``opt.step()`` every ``ACCUMULATE`` batches. ``--explicit`` shows the other way: a FlatPerturb
without ``auto`` and ``perturbed()`` around forward and backward. ``self.optimizers()`` returns
Lightning's ``LightningOptimizer``; ``flatopt.unwrap`` reaches the FlatPerturb inside it.
Either way ``opt.step()`` passes Lightning's no-op closure through: it neither draws again
nor warns. The GPT-2 is built from a config: nothing downloads.
"""

import argparse
from contextlib import nullcontext

import pytorch_lightning as pl
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

import flatopt

ACCUMULATE = 2


def counting(count: int, length: int = 16, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """Sequences a, a+k, a+2k, ... (mod vocab): a toy language to learn."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (count, 1), generator=g)
    strides = torch.randint(1, 4, (count, 1), generator=g)
    return (starts + strides * torch.arange(length)) % vocab


class ManualLoRALanguageModel(pl.LightningModule):
    def __init__(self, explicit: bool):
        super().__init__()
        self.automatic_optimization = False
        self.explicit = explicit
        config = GPT2Config(vocab_size=64, n_positions=16, n_embd=64, n_layer=2, n_head=4)
        lora = LoraConfig(
            r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
        )
        self.model = get_peft_model(GPT2LMHeadModel(config), lora)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()  # a LightningOptimizer around the FlatPerturb
        noise = flatopt.unwrap(opt).perturbed() if self.explicit else nullcontext()
        with noise:
            loss = self.model(input_ids=batch, labels=batch).loss
            self.manual_backward(loss / ACCUMULATE)
        if (batch_idx + 1) % ACCUMULATE == 0:
            opt.step()
            opt.zero_grad()
        self.log("train_loss", loss, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        inner = torch.optim.AdamW(params, lr=3e-3)
        total = self.trainer.max_steps  # manual optimization: max_steps counts opt.step() calls
        return flatopt.FlatPerturb(
            inner, self.model, sigma=0.05, total_steps=total, auto=not self.explicit
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="Flat-LoRA in Lightning's manual optimization.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--explicit", action="store_true", help="perturbed() by hand")
    args = parser.parse_args()
    steps, examples = (4, 64) if args.smoke else (300, 2048)
    torch.manual_seed(0)

    module = ManualLoRALanguageModel(explicit=args.explicit)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
    )
    trainer.fit(
        module,
        DataLoader(counting(examples), batch_size=8, shuffle=True),
        DataLoader(counting(examples // 8, seed=1), batch_size=8),
    )
    flat = flatopt.unwrap(trainer.optimizers[0])
    print(f"val loss {trainer.callback_metrics['val_loss']:.4f} after {flat.num_steps} steps")


if __name__ == "__main__":
    main()
