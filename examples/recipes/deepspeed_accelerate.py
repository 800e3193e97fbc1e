"""Recipe: an Accelerate loop with Accelerate's DeepSpeed plugin (ZeRO-3) and Flat-LoRA, auto=True.

    accelerate launch --num_processes 2 examples/recipes/deepspeed_accelerate.py
    python examples/recipes/deepspeed_accelerate.py [--smoke]   # spawns 2 local gloo CPU ranks

``accelerator.prepare(model, opt)`` hands the FlatPerturb to ``deepspeed.initialize`` (and sets
``"zero_allow_untested_optimizer": true`` in the plugin's config). ``accelerator.backward(loss)``
runs the engine's backward and, at the end of each accumulation window, ``engine.step()``,
which flatopt counts: use ``auto=True``, with no perturb()/restore() to place. On CPU the
plugin needs ``ACCELERATE_USE_DEEPSPEED=true`` and a gloo process group; ``cpu=True`` would
ignore the plugin. Needs ``pip install deepspeed transformers accelerate peft``.
"""

import argparse
import gc
import os
import socket

import torch
import torch.multiprocessing as mp
import transformers
from peft import LoraConfig, get_peft_model

import flatopt

ACCUMULATE = 2
DEEPSPEED = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": ACCUMULATE,
    "zero_optimization": {"stage": 3},
    # No "optimizer" section: DeepSpeed would build its own, which flatopt does not wrap.
}


def run(steps: int) -> None:
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=DEEPSPEED),
        gradient_accumulation_steps=ACCUMULATE,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],  # CPU; leave it out on GPUs
    )
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
    model = get_peft_model(transformers.GPT2LMHeadModel(config), lora)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt = flatopt.FlatPerturb(inner, model, sigma=0.05, total_steps=steps, seed=0, auto=True)
    model, prepared = accelerator.prepare(model, opt)

    data = torch.Generator().manual_seed(accelerator.process_index)  # this rank's data
    for _ in range(steps * ACCUMULATE):
        ids = torch.randint(0, 64, (4, 16), generator=data)
        with accelerator.accumulate(model):
            accelerator.backward(model(input_ids=ids, labels=ids).loss)
            prepared.step()  # a no-op: the engine stepped inside accelerator.backward
            prepared.zero_grad()

    assert opt.num_steps == steps, opt.num_steps  # one per accumulation window
    if accelerator.is_main_process:
        print(
            f"Accelerate + DeepSpeed ZeRO-3 on {accelerator.num_processes} ranks: "
            f"{opt.num_steps} steps of {ACCUMULATE} micro-batches, sigma_t {opt.sigma:.4f}."
        )


def worker(rank: int, world_size: int, port: int, steps: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        run(steps)
    finally:  # leave the process group together, before exit: rank 0 holds its store
        if torch.distributed.is_initialized():
            gc.collect()  # the engine's state, held by reference cycles, goes while it lives
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description="Flat-LoRA: Accelerate + DeepSpeed ZeRO-3.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    steps = 4 if parser.parse_args().smoke else 100
    if "RANK" in os.environ:  # started by accelerate launch, torchrun, ...
        run(steps)
        return
    with socket.socket() as probe:  # a free port, chosen by the OS
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback[0])
    mp.spawn(worker, args=(2, port, steps), nprocs=2)


if __name__ == "__main__":
    main()
