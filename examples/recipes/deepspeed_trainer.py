"""Recipe: the HF Trainer with a DeepSpeed ZeRO-3 config, Flat-LoRA over the optimizer the Trainer
builds (``trainer_optimizer``, ``auto=True``), and a resume from the Trainer's checkpoint.

    deepspeed --num_gpus 2 examples/recipes/deepspeed_trainer.py   # any launcher that sets RANK
    python examples/recipes/deepspeed_trainer.py [--smoke]         # spawns 2 local gloo CPU ranks

Under DeepSpeed the Trainer builds its optimizer itself and drops ``optimizers=(opt, None)``;
``optimizer_cls_and_kwargs=flatopt.integrations.trainer_optimizer(model, args)`` makes the
optimizer it builds a FlatPerturb, which it hands to ``deepspeed.initialize``. The checkpoint's
``global_step*/zero_pp_rank_*_optim_states.pt`` then holds ``FlatPerturb.state_dict()``, its
``"flatopt"`` entry included, so ``train(resume_from_checkpoint=...)`` continues the noise.
Needs ``pip install deepspeed transformers accelerate peft`` (on CPU: ``DS_BUILD_OPS=0``).
"""

import argparse
import gc
import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp
import transformers
from peft import LoraConfig, get_peft_model

import flatopt

DEEPSPEED = {
    "train_micro_batch_size_per_gpu": "auto",  # "auto": the Trainer fills these in from args
    "gradient_accumulation_steps": "auto",
    "zero_optimization": {"stage": 3},
    # No "optimizer" section: DeepSpeed would build its own, which flatopt does not wrap.
}


def lora_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)  # the same model on every rank
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    return get_peft_model(transformers.GPT2LMHeadModel(config), lora)


def train(output_dir: str, steps: int, resume: bool) -> flatopt.FlatPerturb:
    model = lora_gpt2()
    args = transformers.TrainingArguments(
        output_dir=output_dir,
        deepspeed=DEEPSPEED,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=steps,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=steps // 2,
        ddp_backend="gloo",  # CPU; leave it out on GPUs
        report_to=[],
        disable_tqdm=True,
        logging_strategy="no",
    )
    tokens = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids, "labels": ids} for ids in tokens]
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        # sigma ramps over args.max_steps; the seed is args.seed.
        optimizer_cls_and_kwargs=flatopt.integrations.trainer_optimizer(model, args, sigma=0.05),
    )
    checkpoint = os.path.join(output_dir, f"checkpoint-{steps // 2}") if resume else None
    trainer.train(resume_from_checkpoint=checkpoint)
    # The FlatPerturb inside Accelerate's wrapper and DeepSpeed's ZeRO optimizer.
    return flatopt.unwrap(trainer.optimizer)


def run(steps: int, output_dir: str) -> None:
    full = train(output_dir, steps, resume=False)
    resumed = train(output_dir, steps, resume=True)  # a fresh Trainer, from checkpoint-<steps/2>
    assert isinstance(resumed, flatopt.FlatPerturb), type(resumed)
    assert resumed.num_steps == full.num_steps == steps, (resumed.num_steps, full.num_steps)
    assert resumed.seed == full.seed and resumed.sigma == full.sigma
    if int(os.environ["RANK"]) == 0:
        print(
            f"HF Trainer + ZeRO-3: {full.num_steps} steps, sigma_t {full.sigma:.4f}; resumed "
            f"from step {steps // 2}, the noise went on with seed {resumed.seed}."
        )


def worker(rank: int, world_size: int, port: int, steps: int, output_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        run(steps, output_dir)
    finally:  # leave the process group together, before exit: rank 0 holds its store
        if torch.distributed.is_initialized():
            gc.collect()  # the engine's state, held by reference cycles, goes while it lives
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description="Flat-LoRA: HF Trainer + DeepSpeed ZeRO-3.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--output-dir", help="where the ranks save (a shared file system)")
    args = parser.parse_args()
    steps = 4 if args.smoke else 40
    if "RANK" in os.environ:  # started by the deepspeed launcher, torchrun, ...
        run(steps, args.output_dir or "flatopt-deepspeed-trainer")
        return
    with tempfile.TemporaryDirectory() as output_dir:
        with socket.socket() as probe:  # a free port, chosen by the OS
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
        if loopback:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback[0])
        mp.spawn(worker, args=(2, port, steps, output_dir), nprocs=2)


if __name__ == "__main__":
    main()
