"""Peak memory per rank of an FSDP2 (fully_shard) training step, plain LoRA vs FlatPerturb, on CPU.

Each method runs in two fresh gloo processes. Every rank builds the model (8 residual blocks,
d = 1024, MLP 4d, LoRA rank 8 on every linear layer), shards each block and the root, takes one
warm-up step, resets its peak RSS (``/proc/self/clear_refs``), then takes ``--steps`` steps and
reads the new peak (``VmHWM``). glibc is told to serve every buffer of 64 KiB or more with mmap
(``MALLOC_MMAP_THRESHOLD_``), so a freed buffer leaves the RSS.

    python benchmarks/fsdp_memory.py --tokens 32 --out benchmarks/results/fsdp_memory.json
    python benchmarks/fsdp_memory.py --smoke --out /tmp/fsdp_memory.json   # seconds

Linux only (it reads /proc). The budget is one transient layer, never the model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys

from _rank_memory import MIB, per_rank, status

BLOCKS = 4


def rank_main(method: str, rank: int, port: int, steps: int, tokens: int, width: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    import flatopt
    from flatopt.lora import add_lora

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(width, 4 * width)
            self.down = nn.Linear(4 * width, width)

        def forward(self, x):
            return x + self.down(F.gelu(self.up(x)))

    torch.manual_seed(0)
    model = nn.Sequential(*(Block() for _ in range(BLOCKS)))
    add_lora(model, ["up", "down"], rank=8, alpha=16)
    for block in model:
        fully_shard(block)
    fully_shard(model)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt = inner
    if method == "flat":
        opt = flatopt.FlatPerturb(inner, model, sigma=0.05, schedule="constant", seed=0)
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(rank))

    def step() -> None:
        if method == "flat":
            with opt.perturbed():
                model(x).square().mean().backward()
        else:
            model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up: the optimizer state, autograd's and FSDP's buffers
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak RSS to the current RSS
    base = status("VmRSS")
    for _ in range(steps):
        step()
    peak = status("VmHWM")
    shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"rank": rank, "base": base, "peak": peak, "shard_bytes": shard}))
    dist.barrier()  # leave together: a rank exiting while rank 0's store is gone aborts
    dist.destroy_process_group()


def run(method: str, steps: int, tokens: int, width: int) -> list[dict]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, __file__, "--rank", str(rank), "--method", method),
                *("--port", str(port), "--steps", str(steps), "--tokens", str(tokens)),
                *("--width", str(width)),
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    out = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return sorted(out, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help="measured steps")
    parser.add_argument("--repeat", type=int, default=3, help="fresh runs per method")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step per rank")
    parser.add_argument("--width", type=int, default=1024, help="model width d")
    parser.add_argument("--smoke", action="store_true", help="d = 128, one run: seconds")
    parser.add_argument("--out", help="JSON output")
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.method, args.rank, args.port, args.steps, args.tokens, args.width)
        return
    if args.smoke:
        args.width, args.repeat, args.steps, args.tokens = 128, 1, 1, 16
    layer = 4 * args.width * args.width * 4  # the largest target weight, fp32, unsharded
    runs: dict[str, list] = {"lora": [], "flat": []}
    for _ in range(args.repeat):
        for method in runs:
            runs[method].append(run(method, args.steps, args.tokens, args.width))
    print(
        f"model {BLOCKS} blocks, d={args.width}, {args.tokens} tokens per step; largest target "
        f"weight {layer / MIB:.0f} MiB; {args.steps} steps, median of {args.repeat}"
    )
    ranks = per_rank(runs, layer, "params_held_bytes", "in_largest_target_weights", "target weight")
    if args.out:
        report = {
            "benchmark": "fsdp_memory",
            "command": " ".join(sys.argv),
            "config": {
                "blocks": BLOCKS,
                "width": args.width,
                "tokens": args.tokens,
                "steps": args.steps,
                "repeat": args.repeat,
                "world_size": 2,
            },
            "largest_target_weight_bytes": layer,
            "ranks": ranks,
            "runs": runs,
            "load_average": os.getloadavg(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        with open(args.out, "w") as file:
            json.dump(report, file, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
