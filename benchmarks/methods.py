"""What each flat-minimum method costs per step against plain LoRA: Flat-LoRA, Bi-LoRA, LoRA-SAM.

A GPT-style decoder (``benchmarks/_models.TinyGPT``, LoRA on every linear layer of the blocks)
is trained with AdamW on random tokens, in one process, the methods interleaved round by round
so that every ratio compares steps taken under the same machine load:

- ``lora``: plain LoRA, one forward and backward per step;
- ``flat-lora``: ``flatopt.FlatPerturb`` (σ = 0.05, constant schedule), one pass at W + ε;
- ``bi-lora``: ``flatopt.BiLoRA`` (ρ = 0.05, auxiliary rank 8), one pass at W + B₂A₂;
- ``lora-sam``: ``flatopt.LoRASAM`` (ρ = 0.05), two passes per step.

It reports the median seconds per step and its ratio to LoRA, and the peak memory of one step
above the memory held before it: on CUDA ``torch.cuda.max_memory_allocated``, on CPU the peak
of the live tensor bytes, summing each op's own allocations less its frees (``torch.profiler``
with ``profile_memory=True``) in time order: within an op it is a net figure, so it is a lower
bound on the true CPU peak, measured the same way for every method.

    python benchmarks/methods.py --out benchmarks/results/methods.json
    python benchmarks/methods.py --smoke --out /tmp/methods_smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import TinyGPT

import flatopt
from flatopt.lora import add_lora

METHODS = ("lora", "flat-lora", "bi-lora", "lora-sam")


def build(args: argparse.Namespace, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = TinyGPT(args.vocab, args.width, args.layers, args.heads, args.seq)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "blocks" in n]
    return add_lora(model, names, rank=8, alpha=16).to(device).train()


def make_step(name: str, model: nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def loss() -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def closure() -> torch.Tensor:
        value = loss()
        value.backward()
        return value

    if name == "lora":
        opt: Any = inner
    elif name == "flat-lora":
        opt = flatopt.FlatPerturb(inner, model, sigma=0.05, schedule="constant", seed=0)
    elif name == "bi-lora":
        opt = flatopt.BiLoRA(inner, model, rho=0.05, rank=8, seed=0)
    else:
        opt = flatopt.LoRASAM(inner, model, rho=0.05)

    def step() -> None:
        if name == "lora-sam":
            opt.step(closure)
        elif name == "lora":
            closure()
            opt.step()
        else:
            with opt.perturbed():
                closure()
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """The peak memory of one step above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start
    )
    for event in events:  # each op's own allocations less its frees, in time order
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (CI)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per method")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.width, args.layers, args.heads, args.vocab = 32, 1, 2, 64
        args.seq, args.batch, args.rounds = 16, 2, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)

    steps = {name: make_step(name, build(args, device), tokens) for name in METHODS}
    for step in steps.values():  # warm-up: first-call costs, optimizer state
        step()
    peaks = {name: peak_bytes(step, device) for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.rounds):  # interleaved: each round times every method once
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    table = {
        name: {
            "seconds_per_step": median[name],
            "time_vs_lora": median[name] / median["lora"],
            "peak_step_bytes": peaks[name],
            "peak_vs_lora": peaks[name] / peaks["lora"] if peaks["lora"] else None,
        }
        for name in METHODS
    }
    print(f"{'method':<10} {'s/step':>9} {'× LoRA':>7} {'peak MiB':>9} {'× LoRA':>7}")
    for name, row in table.items():
        ratio = "-" if row["peak_vs_lora"] is None else f"{row['peak_vs_lora']:.2f}"
        seconds, peak = row["seconds_per_step"], row["peak_step_bytes"] / 2**20
        print(f"{name:<10} {seconds:>9.4f} {row['time_vs_lora']:>7.2f} {peak:>9.1f} {ratio:>7}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "methods": table,
            "times": times,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
