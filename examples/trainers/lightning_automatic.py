"""Trainers: Flat-LoRA in pytorch-lightning's automatic optimization.

python examples/trainers/lightning_automatic.py [--smoke] [--precision bf16-mixed]

``configure_optimizers`` returns ``FlatPerturb(..., auto=True)``. Lightning runs the training
step of the last micro-batch of an accumulation window inside ``optimizer.step(closure)`` and
the others outside any step: with ``auto=True`` all of them see W + ε of the current optimizer
step, and validation (eval mode) sees W. The GPT-2 is built from a config: nothing downloads.
"""

import argparse

import pytorch_lightning as pl
import torch
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


class LoRALanguageModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        config = GPT2Config(vocab_size=64, n_positions=16, n_embd=64, n_layer=2, n_head=4)
        lora = LoraConfig(
            r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
        )
        self.model = get_peft_model(GPT2LMHeadModel(config), lora)

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        inner = torch.optim.AdamW(params, lr=3e-3)
        # estimated_stepping_batches counts optimizer steps: accumulation included.
        total = int(self.trainer.estimated_stepping_batches)
        return flatopt.FlatPerturb(inner, self.model, sigma=0.05, total_steps=total, auto=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Flat-LoRA in Lightning's automatic loop.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--precision", default="32", help='e.g. "32" or "bf16-mixed"')
    args = parser.parse_args()
    steps, examples = (4, 64) if args.smoke else (300, 2048)
    torch.manual_seed(0)

    module = LoRALanguageModel()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        accumulate_grad_batches=2,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
    )
    trainer.fit(
        module,
        DataLoader(counting(examples), batch_size=8, shuffle=True),
        DataLoader(counting(examples // 8, seed=1), batch_size=8),
    )
    flat = flatopt.unwrap(trainer.optimizers[0])  # only to read its state: nothing to call
    print(f"val loss {trainer.callback_metrics['val_loss']:.4f} after {flat.num_steps} steps")


if __name__ == "__main__":
    main()
