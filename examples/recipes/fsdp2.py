"""Recipe: FSDP2 (``fully_shard``). Shard each block, then the root, as torchtune's distributed
LoRA recipes do, and build the optimizer and FlatPerturb on the sharded model. With gradient
accumulation, skip the gradient sync of all but the last micro-batch. A distributed checkpoint
(DCP) keeps flatopt's seed and step count beside the model and optimizer state.

    torchrun --nproc-per-node 2 examples/recipes/fsdp2.py   # any launcher that sets RANK etc.
    python examples/recipes/fsdp2.py [--smoke]              # spawns 2 local gloo processes

Each rank's forward sees exactly the W + ε that unsharded flatopt gives for the same seed and
rank: a layer's noise is computed from its whole weight, which FSDP gathers for the forward.
The frozen shards are never written.
"""

import argparse
import datetime
import gc
import os
import shutil
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import flatopt
from flatopt.lora import add_lora


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


def build(total_steps: int) -> tuple[nn.Module, flatopt.FlatPerturb]:
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(*(Block(32) for _ in range(4)), nn.Linear(32, 4))
    add_lora(model, ["up", "down"], rank=4, alpha=8)
    for block in model[:-1]:
        fully_shard(block)
    fully_shard(model)
    # After fully_shard, which replaces the parameters by sharded ones: the optimizer, then
    # FlatPerturb around it.
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt = flatopt.FlatPerturb(inner, model, sigma=0.05, total_steps=total_steps, seed=0)
    return model, opt


def train(model: nn.Module, opt: flatopt.FlatPerturb, steps: int, rank: int) -> None:
    accumulate = 2
    for _ in range(steps):
        data = torch.Generator().manual_seed(1000 * rank + opt.num_steps)  # this rank's data
        x, y = torch.randn(64, 32, generator=data), torch.randn(64, 4, generator=data)
        for index, (micro_x, micro_y) in enumerate(zip(x.chunk(accumulate), y.chunk(accumulate))):
            # Accumulate locally; the last micro-batch's backward reduce-scatters.
            model.set_requires_gradient_sync(index == accumulate - 1)
            with opt.perturbed():
                (F.mse_loss(model(micro_x), micro_y) / accumulate).backward()
        opt.step()
        opt.zero_grad()


def state(model: nn.Module, opt: flatopt.FlatPerturb) -> dict:
    # Hand DCP the wrapped optimizer: on a fresh one, get_state_dict takes a step with zero
    # gradients to create its state, which on the wrapper would count as a step of the schedule.
    # DCP keeps an optimizer's "state" and "param_groups" only: flatopt's entry goes beside them.
    model_state, optim_state = get_state_dict(model, opt.optimizer)
    return {"model": model_state, "optim": optim_state, "flatopt": opt.state_dict()["flatopt"]}


def save(model: nn.Module, opt: flatopt.FlatPerturb, path: str) -> None:
    dcp.save(state(model, opt), checkpoint_id=path)


def load(model: nn.Module, opt: flatopt.FlatPerturb, path: str) -> None:
    state_dict = state(model, opt)
    dcp.load(state_dict, checkpoint_id=path)  # fills ``state_dict`` in place
    set_state_dict(
        model,
        opt.optimizer,
        model_state_dict=state_dict["model"],
        optim_state_dict=state_dict["optim"],
    )
    loaded = opt.state_dict()  # the optimizer state just loaded, plus flatopt's saved entry
    loaded["flatopt"] = state_dict["flatopt"]
    opt.load_state_dict(loaded)


def run(rank: int, world_size: int, steps: int) -> None:
    model, opt = build(steps)
    frozen = {n: p.to_local().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train(model, opt, steps // 2, rank)

    # Save mid-run, then resume into fresh objects, as after a restart.
    path = [tempfile.mkdtemp(prefix="flatopt-fsdp2-") if rank == 0 else None]
    dist.broadcast_object_list(path)
    save(model, opt, path[0])
    model, opt = build(steps)
    load(model, opt, path[0])
    train(model, opt, steps - steps // 2, rank)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path[0])

    # This rank's shards of the frozen weights: bitwise what they were before training.
    now = {n: p.to_local() for n, p in model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(now[n], frozen[n]) for n in frozen), "a frozen shard changed"
    if rank == 0:
        print(
            f"{world_size} ranks, {opt.num_steps} steps (resumed at {steps // 2}), sigma_t "
            f"{opt.sigma:.4f}: the {len(frozen)} frozen tensors are bitwise unchanged."
        )


def main_worker(rank: int, world_size: int, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        run(rank, world_size, steps)  # the model and optimizers are gone before the group is
        gc.collect()  # including any held only by a reference cycle
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_locally(world_size: int, steps: int) -> None:
    """Start ``world_size`` processes on this machine, talking over the loopback interface."""
    with socket.socket() as probe:  # a free port, chosen by the OS
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback[0])
    mp.spawn(main_worker, args=(world_size, steps), nprocs=world_size)


def main() -> None:
    parser = argparse.ArgumentParser(description="Flat-LoRA on a model sharded with FSDP2.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    steps = 6 if parser.parse_args().smoke else 100
    if "RANK" in os.environ:  # started by torchrun (or another launcher)
        main_worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), steps)
    else:
        spawn_locally(2, steps)


if __name__ == "__main__":
    main()
