"""Trainers: transformers.Trainer builds its own optimizer, and flatopt wraps it.

python examples/trainers/hf_trainer_own_optimizer.py [--smoke]

``flatopt.integrations.trainer_optimizer(model, args, ...)`` returns the pair the Trainer takes
as ``optimizer_cls_and_kwargs``. At ``train()`` the Trainer builds the optimizer ``args.optim``
names, with its learning rate and its weight-decay parameter groups, and gets it back wrapped in
``FlatPerturb(..., auto=True)``. The noise ramp lasts ``args.max_steps`` optimizer steps and its
seed is ``args.seed``. The tiny GPT-2 is built from a config so that nothing is downloaded; with a
real model, load it with ``AutoModelForCausalLM.from_pretrained(...)`` instead.
"""

import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import flatopt


def counting(count: int, length: int = 16, vocab: int = 64, seed: int = 0) -> list[dict]:
    """Sequences a, a+k, a+2k, ... (mod vocab): a toy language to learn."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (count, 1), generator=g)
    strides = torch.randint(1, 4, (count, 1), generator=g)
    ids = ((starts + strides * torch.arange(length)) % vocab).tolist()
    return [{"input_ids": row, "labels": row} for row in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description="Flat-LoRA over the Trainer's own optimizer.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    smoke = parser.parse_args().smoke
    steps, examples = (4, 64) if smoke else (300, 2048)
    torch.manual_seed(0)

    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=64, n_layer=2, n_head=4)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    model = get_peft_model(GPT2LMHeadModel(config), lora)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,  # also the length of flatopt's noise ramp
            learning_rate=3e-3,
            weight_decay=0.01,  # the Trainer's groups: none on biases and norms
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            logging_steps=max(1, steps // 5),
            save_strategy="no",
            report_to="none",
            use_cpu=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=counting(examples),
            eval_dataset=counting(examples // 8, seed=1),
            optimizer_cls_and_kwargs=flatopt.integrations.trainer_optimizer(
                model, args, sigma=0.05
            ),
        )
        trainer.train()
        metrics = trainer.evaluate()  # eval mode: the forwards see the clean W

    flat = flatopt.unwrap(trainer.optimizer)
    print(
        f"eval loss {metrics['eval_loss']:.4f} after {flat.num_steps} optimizer steps of "
        f"{type(flat.optimizer).__name__} under Flat-LoRA"
    )


if __name__ == "__main__":
    main()
