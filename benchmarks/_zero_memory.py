"""Peak memory per rank of a DeepSpeed ZeRO-3 training step, plain LoRA vs FlatPerturb, on CPU.

Each method runs in two fresh gloo processes. Every rank builds the model (4 residual blocks,
d = 1024, MLP 4d, LoRA rank 8 on every linear layer), hands it to ``deepspeed.initialize``
(ZeRO-3, every weight partitioned: ``stage3_param_persistence_threshold: 0``), takes one warm-up
step, resets its peak RSS (``/proc/self/clear_refs``), then takes ``--steps`` steps and reads the
new peak (``VmHWM``). glibc is told to serve every buffer of 64 KiB or more with mmap
(``MALLOC_MMAP_THRESHOLD_``), so a freed buffer leaves the RSS. The budget: FlatPerturb's peak
exceeds plain LoRA's by at most one *gathered* target weight (the W + ε of the layer computing).

    python benchmarks/_zero_memory.py --tokens 32 --out benchmarks/results/zero_memory.json
    python benchmarks/_zero_memory.py --smoke --out /tmp/zero_memory.json   # seconds

Needs deepspeed (``DS_BUILD_OPS=0 pip install deepspeed``), so it is not among the benchmarks
``.ci/run`` runs in its venv without deepspeed (the leading underscore): ``.ci/integrations.sh``
runs it in the DeepSpeed venv. Linux only (it reads /proc).
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


def rank_main(method: str, rank: int, steps: int, tokens: int, width: int) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    import flatopt
    from flatopt.lora import add_lora

    torch.set_num_threads(1)

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
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    flat = None
    if method == "flat":
        flat = flatopt.FlatPerturb(inner, model, sigma=0.05, schedule="constant", seed=0)
    config = {
        "train_micro_batch_size_per_gpu": tokens,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=inner, config=config)
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(rank))

    def step() -> None:
        if flat is not None:
            with flat.perturbed():
                engine.backward(engine(x).square().mean())
        else:
            engine.backward(engine(x).square().mean())
        engine.step()

    step()  # warm-up: the optimizer state, autograd's and DeepSpeed's buffers
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak RSS to the current RSS
    base = status("VmRSS")
    for _ in range(steps):
        step()
    peak = status("VmHWM")
    shard = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    print(json.dumps({"rank": rank, "base": base, "peak": peak, "shard_bytes": shard}))
    engine.destroy()
    dist.destroy_process_group()


def run(method: str, steps: int, tokens: int, width: int) -> list[dict]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
    }
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, __file__, "--rank", str(rank), "--method", method),
                *("--steps", str(steps), "--tokens", str(tokens), "--width", str(width)),
            ],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # DeepSpeed's log lines
            text=True,
        )
        for rank in range(2)
    ]
    out = []
    for proc in procs:
        stdout = proc.communicate()[0]
        lines = [line for line in stdout.splitlines() if line.startswith('{"rank"')]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"a {method} rank failed (exit {proc.returncode}):\n{stdout}")
        out.append(json.loads(lines[-1]))
    return sorted(out, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help="measured steps")
    parser.add_argument("--repeat", type=int, default=3, help="fresh runs per method")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step per rank")
    parser.add_argument("--width", type=int, default=1024, help="model width d")
    parser.add_argument("--smoke", action="store_true", help="d = 128, one run: seconds")
    parser.add_argument("--out", help="JSON output")
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.method, args.rank, args.steps, args.tokens, args.width)
        return
    if args.smoke:
        args.width, args.repeat, args.steps, args.tokens = 128, 1, 1, 16
    layer = 4 * args.width * args.width * 4  # the largest target weight, fp32, gathered whole
    runs: dict[str, list] = {"lora": [], "flat": []}
    for _ in range(args.repeat):
        for method in runs:
            runs[method].append(run(method, args.steps, args.tokens, args.width))
    print(
        f"ZeRO-3, model {BLOCKS} blocks, d={args.width}, {args.tokens} tokens per step; largest "
        f"gathered target weight {layer / MIB:.0f} MiB; {args.steps} steps, median of "
        f"{args.repeat}"
    )
    ranks = per_rank(
        runs,
        layer,
        "partition_bytes",
        "in_largest_gathered_target_weights",
        "gathered target weight",
    )
    if args.out:
        import deepspeed
        import torch

        report = {
            "benchmark": "zero_memory",
            "command": " ".join(sys.argv),
            "config": {
                "blocks": BLOCKS,
                "width": args.width,
                "tokens": args.tokens,
                "steps": args.steps,
                "repeat": args.repeat,
                "world_size": 2,
                "zero_stage": 3,
            },
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
            "largest_gathered_target_weight_bytes": layer,
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
