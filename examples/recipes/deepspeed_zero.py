"""Recipe: DeepSpeed ZeRO-3 (or ZeRO-1/2). Build the optimizer and FlatPerturb, hand DeepSpeed the
inner optimizer, then train with ``engine(x)``, ``engine.backward(loss)`` and ``engine.step()``
inside ``opt.perturbed()``; flatopt counts each optimizer step the engine takes.

    deepspeed --num_gpus 2 examples/recipes/deepspeed_zero.py   # any launcher that sets RANK etc.
    python examples/recipes/deepspeed_zero.py [--smoke]         # spawns 2 local gloo CPU processes

Each rank's forward sees exactly the W + ε that unsharded flatopt gives for the same seed and
rank: a layer's noise is computed from the whole weight DeepSpeed gathers for its forward. The
frozen partitions are never written. Needs ``pip install deepspeed`` (on CPU:
``DS_BUILD_OPS=0``); DeepSpeed picks its CPU accelerator and gloo by itself.
"""

import argparse
import gc
import os
import socket

import deepspeed
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import flatopt
from flatopt.lora import add_lora


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


CONFIG = {
    "train_micro_batch_size_per_gpu": 32,
    "gradient_accumulation_steps": 2,  # engine.step() after every micro-batch; DeepSpeed
    "zero_optimization": {"stage": 3},  # steps the optimizer at each boundary
    "steps_per_print": 10**9,
}


def run(steps: int) -> None:
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(*(Block(32) for _ in range(4)), nn.Linear(32, 4))
    add_lora(model, ["up", "down"], rank=4, alpha=8)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # FlatPerturb before or after deepspeed.initialize: either order works.
    opt = flatopt.FlatPerturb(inner, model, sigma=0.05, total_steps=steps, seed=0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=inner, config=CONFIG)

    frozen = {n: p.ds_tensor.clone() for n, p in model.named_parameters() if not p.requires_grad}
    accumulate = CONFIG["gradient_accumulation_steps"]
    for _ in range(steps):
        data = torch.Generator().manual_seed(1000 * rank + opt.num_steps)  # this rank's data
        for _ in range(accumulate):
            x, y = torch.randn(32, 32, generator=data), torch.randn(32, 4, generator=data)
            with opt.perturbed():
                engine.backward(F.mse_loss(engine(x), y))
            engine.step()  # steps the optimizer at the boundary; flatopt counts that step

    # This rank's partitions of the frozen weights: bitwise what they were before training.
    now = {n: p.ds_tensor for n, p in model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(now[n], frozen[n]) for n in frozen), "a frozen partition changed"
    assert opt.num_steps == steps, opt.num_steps
    if rank == 0:
        print(
            f"ZeRO-3 on {engine.world_size} ranks, {opt.num_steps} steps, sigma_t "
            f"{opt.sigma:.4f}: the {len(frozen)} frozen partitions are bitwise unchanged."
        )
    engine.destroy()


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
    parser = argparse.ArgumentParser(description="Flat-LoRA under DeepSpeed ZeRO-3.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    steps = 4 if parser.parse_args().smoke else 100
    if "RANK" in os.environ:  # started by the deepspeed launcher, torchrun, ...
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
