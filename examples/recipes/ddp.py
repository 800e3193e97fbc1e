"""Recipe: DistributedDataParallel. Wrap the model in DDP and the optimizer in FlatPerturb; with
gradient accumulation, skip the all-reduce of all but the last micro-batch with no_sync().

    torchrun --nproc-per-node 2 examples/recipes/ddp.py   # any launcher that sets RANK etc.
    python examples/recipes/ddp.py [--smoke]              # spawns 2 local gloo processes

Each rank draws its own ε (rank_noise=True, the default), so the averaged gradient averages
world_size samples of the expected loss. The frozen weights are never written, so the ranks
cannot drift apart, and the σ schedule counts optimizer steps whatever the world size.
"""

import argparse
import datetime
import gc
import os
import socket
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import flatopt
from flatopt.lora import add_lora


def train(rank: int, world_size: int, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        # DDP and the optimizers live in run(): they are gone before the process group is.
        run(rank, world_size, steps)
        gc.collect()  # DDP may sit in a reference cycle: collect it while the group lives
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(rank: int, world_size: int, steps: int) -> None:
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))
    add_lora(model, ["0", "2"], rank=4, alpha=8)
    ddp = DistributedDataParallel(model)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # FlatPerturb finds the LoRA layers in the plain model; DDP's forward runs the same modules.
    opt = flatopt.FlatPerturb(inner, model, sigma=0.05, total_steps=steps, seed=0)
    accumulate = 2
    data = torch.Generator().manual_seed(rank)  # each rank its own shard of data
    for _ in range(steps):
        x, y = torch.randn(32 * accumulate, 16, generator=data), torch.randn(32 * accumulate, 4)
        for index, (micro_x, micro_y) in enumerate(zip(x.chunk(accumulate), y.chunk(accumulate))):
            last = index == accumulate - 1
            # no_sync(): accumulate locally; the last micro-batch's backward all-reduces.
            with nullcontext() if last else ddp.no_sync(), opt.perturbed():
                loss = F.mse_loss(ddp(micro_x), micro_y) / accumulate
                loss.backward()
        opt.step()
        opt.zero_grad()

    # Every rank holds the same LoRA factors: check it by gathering them.
    mine = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine)
    assert all(torch.equal(mine, other) for other in everyone), "the ranks diverged"
    if rank == 0:
        print(f"{world_size} ranks, {opt.num_steps} steps, sigma_t {opt.sigma:.4f}: in sync.")


def spawn_locally(world_size: int, steps: int) -> None:
    """Start ``world_size`` processes on this machine, talking over the loopback interface."""
    with socket.socket() as probe:  # a free port, chosen by the OS
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback[0])
    mp.spawn(train, args=(world_size, steps), nprocs=world_size)


def main() -> None:
    parser = argparse.ArgumentParser(description="Flat-LoRA with DistributedDataParallel.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    steps = 5 if parser.parse_args().smoke else 100
    if "RANK" in os.environ:  # started by torchrun (or another launcher)
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), steps)
    else:
        spawn_locally(2, steps)


if __name__ == "__main__":
    main()
