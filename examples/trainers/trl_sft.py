"""Trainers: Flat-LoRA inside TRL's SFTTrainer.

python examples/trainers/trl_sft.py [--smoke]

SFTTrainer is a transformers.Trainer: hand it ``FlatPerturb(..., auto=True)`` through
``optimizers=``. TRL's defaults stay on here, gradient checkpointing and bf16 autocast: the
re-run forwards of checkpointing see the same W + ε, bit for bit. The tokenizer is a word-level
one built in memory and the GPT-2 is built from a config, so nothing is downloaded.
"""

import argparse
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

import flatopt

WORDS = 60  # the numbers "0" ... "59"


def number_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<eos>": 0, "<unk>": 1, **{str(i): i + 2 for i in range(WORDS)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=inner, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>"
    )


def counting(count: int, length: int = 12, seed: int = 0) -> Dataset:
    """Texts "a a+k a+2k ..." (mod WORDS): a toy language to learn."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, WORDS, (count, 1), generator=g)
    strides = torch.randint(1, 4, (count, 1), generator=g)
    rows = ((starts + strides * torch.arange(length)) % WORDS).tolist()
    return Dataset.from_dict({"text": [" ".join(map(str, row)) for row in rows]})


def main() -> None:
    parser = argparse.ArgumentParser(description="Flat-LoRA inside TRL's SFTTrainer.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    smoke = parser.parse_args().smoke
    steps, examples = (4, 64) if smoke else (300, 2048)
    torch.manual_seed(0)

    tokenizer = number_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=64, n_layer=2, n_head=4)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    model = get_peft_model(GPT2LMHeadModel(config), lora)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    opt = flatopt.FlatPerturb(inner, model, sigma=0.05, total_steps=steps, seed=0, auto=True)

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            logging_steps=max(1, steps // 5),
            save_strategy="no",
            report_to="none",
            use_cpu=True,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=counting(examples),
            eval_dataset=counting(examples // 8, seed=1),
            processing_class=tokenizer,
            optimizers=(opt, None),
        )
        trainer.train()
        metrics = trainer.evaluate()

    print(f"eval loss {metrics['eval_loss']:.4f} after {opt.num_steps} optimizer steps")


if __name__ == "__main__":
    main()
